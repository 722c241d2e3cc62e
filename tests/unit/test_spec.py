"""The job spec: good specs load; bad ones name the YAML path and say what to change."""

from __future__ import annotations

import textwrap

import pytest

from batch.errors import SpecError
from batch.spec import describe_fields, load_spec, parse_spec

GOOD = textwrap.dedent(
    """\
    name: enrich
    input:
      path: s3://bucket/reviews/
      id_column: review_id
    output:
      path: s3://bucket/out/
    model:
      path: builtin:smollm2-135m-instruct
      task: generate
      engine_args: {max_model_len: 2048}
    prompt:
      template: "Summarise: {{ body }}"
    sampling:
      max_tokens: 32
    resources:
      device: cpu
      rows_per_chunk: 100
    """
)


def error_of(text: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="job.yaml", overrides=overrides)
    return str(info.value)


def test_good_spec_loads_with_defaults() -> None:
    spec = parse_spec(GOOD)
    assert spec.model.task == "generate"
    assert spec.pipeline_name == "generate"
    assert spec.sampling.temperature == 0.0
    assert spec.resources.replicas == 1
    assert spec.model.engine_args == {"max_model_len": 2048}


def test_spec_is_frozen() -> None:
    spec = parse_spec(GOOD)
    with pytest.raises(Exception, match="frozen"):
        spec.name = "other"  # type: ignore[misc]


def test_unknown_key_suggests_the_nearest_valid_key_with_line() -> None:
    msg = error_of(GOOD.replace("max_tokens: 32", "max_token: 32"))
    assert "job.yaml:14 sampling.max_token: unknown key" in msg
    assert "did you mean 'max_tokens'?" in msg


def test_wrong_enum_names_path_and_choices() -> None:
    msg = error_of(GOOD.replace("task: generate", "task: gen"))
    assert "job.yaml:9 model.task" in msg
    assert "'generate' or 'embed'" in msg
    assert "got 'gen'" in msg


def test_missing_required_field_says_add_it() -> None:
    msg = error_of(GOOD.replace('  template: "Summarise: {{ body }}"\n', "  system: hi\n"))
    assert "prompt.template: required, add it" in msg


def test_wrong_type_names_path() -> None:
    msg = error_of(GOOD.replace("rows_per_chunk: 100", "rows_per_chunk: lots"))
    assert "job.yaml:17 resources.rows_per_chunk" in msg
    assert "integer" in msg


def test_override_sets_nested_field_with_yaml_typing() -> None:
    spec = parse_spec(
        GOOD,
        overrides=["output.path=/tmp/out", "resources.replicas=2", "input.columns=[review_id, b]"],
    )
    assert spec.output.path == "/tmp/out"
    assert spec.resources.replicas == 2
    assert spec.input.columns == ["review_id", "b"]


def test_bad_override_is_flagged_as_coming_from_set() -> None:
    msg = error_of(GOOD, overrides=("resources.replicas=0",))
    assert "(from --set) resources.replicas" in msg
    assert "greater than or equal to 1" in msg


def test_override_without_equals_explains_the_form() -> None:
    msg = error_of(GOOD, overrides=("output.path",))
    assert "--set a.b=value" in msg


def test_pipeline_task_mismatch_is_refused() -> None:
    msg = error_of(GOOD.replace("sampling:", "pipeline: embed\nsampling:"))
    assert "pipeline 'embed' does not fit model.task 'generate'" in msg


def test_embed_with_system_message_is_refused() -> None:
    text = GOOD.replace("task: generate", "task: embed").replace(
        "prompt:\n", "prompt:\n  system: be nice\n"
    )
    assert "embeddings take no system message" in error_of(text)


def test_invalid_yaml_names_the_line() -> None:
    msg = error_of("name: x\ninput: [unclosed\n")
    assert msg.startswith("job.yaml:")
    assert "not valid YAML" in msg


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="no such job file"):
        load_spec("does/not/exist.yaml")


def test_fingerprint_ignores_where_output_goes_but_not_the_prompt() -> None:
    a = parse_spec(GOOD)
    b = parse_spec(GOOD, overrides=["output.path=/elsewhere"])
    c = parse_spec(GOOD, overrides=["prompt.template=Other {{ body }}"])
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_speed_only_engine_args_may_change_on_resume_but_not_dtype() -> None:
    """Lowering gpu_memory_utilization (or eager mode, batch limits) to get past an OOM keeps
    the job's fingerprint, so the resume is accepted; a different dtype changes outputs."""
    a = parse_spec(GOOD)
    speed = parse_spec(
        GOOD,
        overrides=[
            "model.engine_args.gpu_memory_utilization=0.5",
            "model.engine_args.enforce_eager=true",
            "model.engine_args.max_num_seqs=8",
            "model.engine_args.tensor_parallel_size=2",
        ],
    )
    dtype = parse_spec(GOOD, overrides=["model.engine_args.dtype=float16"])
    length = parse_spec(GOOD, overrides=["model.engine_args.max_model_len=4096"])
    assert speed.fingerprint() == a.fingerprint()
    assert dtype.fingerprint() != a.fingerprint()
    assert length.fingerprint() != a.fingerprint()
    assert speed.fingerprint_fields()["model"]["engine_args"] == {"max_model_len": 2048}


def test_every_field_is_described() -> None:
    rows = describe_fields()
    assert all(desc for _, _, desc in rows), [p for p, _, d in rows if not d]
    assert ("resources.device", "default 'cpu'") in [(p, d) for p, d, _ in rows]


def test_example_jobs_are_valid() -> None:
    for job in ("jobs/enrich.yaml", "jobs/embed.yaml"):
        spec = load_spec(job)
        assert spec.model.path.startswith("builtin:")


# --------------------------------------------------------------------------- response:

TYPED = GOOD + textwrap.dedent(
    """\
    response:
      fields:
        sentiment: [positive, negative, mixed]
        summary: {type: string, maxLength: 160}
        stars: int
    """
)


def test_fingerprint_of_a_spec_without_response_is_unchanged() -> None:
    """Pinned before typed answers existed: outputs written then must still resume."""
    assert parse_spec(GOOD).fingerprint() == "fc13869ab2f8d2fe"
    assert "response" not in parse_spec(GOOD).fingerprint_fields()


def test_response_is_part_of_the_fingerprint() -> None:
    typed = parse_spec(TYPED)
    assert typed.fingerprint() != parse_spec(GOOD).fingerprint()
    other = parse_spec(TYPED, overrides=["response.fields.stars=float"])
    assert other.fingerprint() != typed.fingerprint()


def test_typed_spec_loads() -> None:
    spec = parse_spec(TYPED)
    assert spec.response is not None
    assert spec.response.fields is not None and spec.response.fields["stars"] == "int"
    assert spec.response.max_resamples == 2


def test_broken_schema_names_the_line_of_the_inner_key_and_what_to_write() -> None:
    msg = error_of(TYPED.replace("stars: int", "stars: integr"))
    assert "job.yaml:22 response.fields.stars: unknown type 'integr'; did you mean 'int'?" in msg


def test_broken_schema_from_set_names_the_path() -> None:
    msg = error_of(TYPED, overrides=("response.fields.stars=integr",))
    assert "response.fields.stars: unknown type 'integr'" in msg
    assert "(from --set)" in msg


def test_bad_json_schema_keyword_names_its_line() -> None:
    text = GOOD + textwrap.dedent(
        """\
        response:
          json_schema:
            type: object
            properties:
              a:
                anyOf: [{type: string}]
        """
    )
    msg = error_of(text)
    assert "job.yaml:23 response.json_schema.properties.a.anyOf: 'anyOf' is not supported" in msg


def test_one_label_enum_is_refused() -> None:
    msg = error_of(TYPED.replace("[positive, negative, mixed]", "[positive]"))
    assert "job.yaml:20 response.fields.sentiment: a one-label enum [positive]" in msg
    msg = error_of(GOOD + "response:\n  choice: [positive]\n")
    assert "response.choice: list at least 2 labels" in msg


def test_two_kinds_are_refused() -> None:
    msg = error_of(TYPED.replace("  fields:", "  choice: [a, b]\n  fields:"))
    assert "response: set one of fields, json_schema, choice, regex (got fields and choice)" in msg
    assert "set one of fields" in error_of(GOOD + "response: {confidence: false}\n")


def test_response_with_embed_is_refused() -> None:
    msg = error_of(TYPED.replace("task: generate", "task: embed"))
    assert "typed answers need model.task: generate" in msg


def test_reserved_and_clashing_column_names_are_refused() -> None:
    msg = error_of(TYPED.replace("stars: int", "finish_reason: str"))
    assert "response.fields.finish_reason: 'finish_reason' is a reserved column name" in msg
    msg = error_of(TYPED.replace("stars: int", "sentiment_confidence: float"))
    assert "clashes with the confidence column" in msg
    assert parse_spec(
        TYPED.replace("stars: int", "sentiment_confidence: float"),
        overrides=("response.confidence=false",),
    ).response


def test_logits_mode_cannot_give_a_confidence() -> None:
    msg = error_of(TYPED, overrides=("model.engine_args.logprobs_mode=raw_logits",))
    assert "response.confidence needs probabilities" in msg


def test_bad_regex_and_unknown_response_key() -> None:
    assert "not a regular expression" in error_of(GOOD + "response:\n  regex: '(a'\n")
    msg = error_of(TYPED.replace("  fields:", "  max_resample: 3\n  fields:"))
    assert "response.max_resample: unknown key; did you mean 'max_resamples'?" in msg


def test_spec_reference_lists_response_fields() -> None:
    paths = [p for p, _, _ in describe_fields()]
    assert "response" in paths
    assert {"response.fields", "response.choice", "response.max_resamples"} <= set(paths)


def test_yes_no_labels_must_be_quoted() -> None:
    """YAML reads [yes, no] as booleans; the error says to quote them, not 'a valid string'."""
    assert "quote the labels" in error_of(GOOD + "response:\n  choice: [yes, no]\n")
    assert "quote the labels" in error_of(GOOD + "response:\n  fields: {ok: [yes, no]}\n")
    spec = parse_spec(GOOD + "response:\n  choice: ['yes', 'no']\n")
    assert spec.response is not None and spec.response.choice == ["yes", "no"]


def test_extra_args_may_not_fight_the_response() -> None:
    msg = error_of(TYPED, overrides=("sampling.extra_args={best_of: 3}",))
    assert "sampling.extra_args.best_of: response sets it" in msg
    msg = error_of(TYPED, overrides=('sampling.extra_args={structured_outputs: {json: "{}"}}',))
    assert "sampling.extra_args.structured_outputs: response sets it" in msg
    assert parse_spec(GOOD, overrides=("sampling.extra_args={best_of: 3}",)).response is None


# ------------------------------------------------------------- n, logprobs, chat kwargs


def test_new_fields_at_their_defaults_keep_the_fingerprint() -> None:
    """n: 1, logprobs: null and chat_template_kwargs: {} written out change nothing."""
    spelled = GOOD.replace(
        "  max_tokens: 32\n", "  max_tokens: 32\n  n: 1\n  logprobs: null\n"
    ).replace('{{ body }}"\n', '{{ body }}"\n  chat_template_kwargs: {}\n')
    assert parse_spec(spelled).fingerprint() == "fc13869ab2f8d2fe"


def test_new_fields_set_change_the_fingerprint() -> None:
    base = parse_spec(GOOD).fingerprint()
    for item in (
        "sampling.n=2",
        "sampling.logprobs=0",
        "prompt.chat_template_kwargs.enable_thinking=false",
    ):
        spec = parse_spec(GOOD, overrides=("sampling.temperature=0.7", item))
        warm = parse_spec(GOOD, overrides=("sampling.temperature=0.7",)).fingerprint()
        assert spec.fingerprint() != warm, item
        assert warm != base


def test_n_and_logprobs_load() -> None:
    spec = parse_spec(GOOD, overrides=("sampling.n=4", "sampling.temperature=0.8"))
    assert spec.sampling.n == 4
    spec = parse_spec(GOOD, overrides=("sampling.logprobs=5",))
    assert spec.sampling.logprobs == 5
    spec = parse_spec(GOOD, overrides=("prompt.chat_template_kwargs.enable_thinking=false",))
    assert spec.prompt.chat_template_kwargs == {"enable_thinking": False}


def test_n_needs_a_temperature() -> None:
    msg = error_of(GOOD, overrides=("sampling.n=3",))
    assert "sampling.n is 3 but sampling.temperature is 0" in msg
    assert "set sampling.temperature > 0" in msg


def test_n_and_logprobs_ranges() -> None:
    assert "sampling.n" in error_of(GOOD, overrides=("sampling.n=0",))
    assert "sampling.n" in error_of(GOOD, overrides=("sampling.n=65", "sampling.temperature=1"))
    assert "sampling.logprobs" in error_of(GOOD, overrides=("sampling.logprobs=21",))
    assert "sampling.logprobs" in error_of(GOOD, overrides=("sampling.logprobs=-1",))


def test_logprobs_above_the_engines_max_is_refused() -> None:
    msg = error_of(GOOD, overrides=("sampling.logprobs=8", "model.engine_args.max_logprobs=5"))
    assert "sampling.logprobs is 8 but the engine keeps at most 5" in msg
    ok = parse_spec(GOOD, overrides=("sampling.logprobs=5", "model.engine_args.max_logprobs=5"))
    assert ok.sampling.logprobs == 5


def test_extra_args_n_and_logprobs_point_to_the_new_fields() -> None:
    """Before, extra_args.n was sent to vLLM and all but outputs[0] silently dropped."""
    msg = error_of(GOOD, overrides=("sampling.extra_args.n=3",))
    assert "sampling.extra_args.n: use sampling.n" in msg
    msg = error_of(GOOD, overrides=("sampling.extra_args.logprobs=2",))
    assert "sampling.extra_args.logprobs: use sampling.logprobs" in msg
    # other SamplingParams fields still pass through without response
    spec = parse_spec(GOOD, overrides=("sampling.extra_args.presence_penalty=0.5",))
    assert spec.sampling.extra_args == {"presence_penalty": 0.5}


def test_new_fields_are_described() -> None:
    paths = [p for p, _, _ in describe_fields()]
    for p in ("sampling.n", "sampling.logprobs", "prompt.chat_template_kwargs"):
        assert p in paths
