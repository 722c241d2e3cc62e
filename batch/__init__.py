"""batchinfer: resumable batch inference over Parquet with Ray Data and vLLM.

Importing this package loads neither Ray, vLLM nor torch; they load when a job runs.
"""

__version__ = "0.1.0"
