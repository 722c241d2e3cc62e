"""The price table: the packaged data loads and is traceable; bad tables and overrides are
rejected with the file, row and field named; costs are list price x tokens."""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from batch.errors import ConfigurationError
from batch.prices import (
    LISTS,
    PriceTable,
    UnknownPriceError,
    api_cost,
    embedding_cost,
    load_price_table,
)

DATE = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?|undated")
Raw = dict[str, Any]


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_price_table()


@pytest.fixture
def raw() -> Raw:
    text = (resources.files("batch") / "data" / "prices.yaml").read_text(encoding="utf-8")
    data: Raw = yaml.safe_load(text)
    return data


def rows(table: PriceTable) -> list[tuple[str, Any]]:
    return [(name, row) for name in LISTS for row in getattr(table, name)]


# --------------------------------------------------------------------------- packaged data


def test_packaged_table_loads_with_its_version(table: PriceTable) -> None:
    assert table.version == "2026-11-22"
    assert table.collected == "2026-11-22"
    assert table.currency == "USD"
    assert {"GP", "CL", "AE", "SB", "DR"} <= set(table.sources)
    assert all(getattr(table, name) for name in LISTS)


def test_packaged_data_file_ships_inside_the_package() -> None:
    # pyproject's package-data (batch = ["data/*"]) puts it in the wheel; the loader reads it
    # through importlib.resources, so it must sit inside the package, not beside it.
    assert (resources.files("batch") / "data" / "prices.yaml").is_file()


def test_every_row_names_a_known_source_and_a_date(table: PriceTable) -> None:
    for name, row in rows(table):
        assert row.source.strip(), (name, row)
        first_keys = [part.split()[0].rstrip(":") for part in row.source.split(";")]
        assert all(k in table.sources for k in first_keys), (name, row.source)
        assert DATE.fullmatch(row.date), (name, row.date)


def test_defaults_resolve_to_rows(table: PriceTable) -> None:
    d = table.defaults
    assert len(d.generate_comparators) >= 6
    for key in d.generate_comparators:
        assert table.chat_price(key).key == key
    assert {table.embedding_price(k).key for k in d.embed_comparators} == {
        r.key for r in table.embedding
    }
    gpu = table.gpu_rate(d.gpu.provider, d.gpu.gpu)
    assert (gpu.provider, gpu.gpu, gpu.instance, gpu.usd_per_hour) == (
        "lambda",
        "H100-SXM",
        "1x",
        4.29,
    )
    cpu = table.cpu_rate()
    assert (cpu.provider, cpu.instance, cpu.source) == ("generic", "2 vCPU", "assumption")
    assert "assumption" in (cpu.note or "").lower()


def test_rows_transcribed_from_the_reference(table: PriceTable) -> None:
    sonnet = table.chat_price("anthropic/claude-sonnet-4.5")
    assert (sonnet.input, sonnet.cached_input, sonnet.output) == (3.00, 0.30, 15.00)
    assert "200K" in (sonnet.note or "") and "22.50" in (sonnet.note or "")
    host = table.chat_price("groq/llama-3.1-8b-instant")
    assert (host.input, host.cached_input, host.output) == (0.05, None, 0.08)
    assert table.embedding_price("voyage/voyage-4-large").input == 0.12
    together = table.batch_discount_row("together")
    assert (
        together is not None
        and together.discount == 0.5
        and "up to" in (together.note or "").lower()
    )
    assert table.gpu_rate("lambda", "H100-SXM", "8x").usd_per_hour == 3.99
    assert table.gpu_rate("runpod-community", "H100-SXM").usd_per_hour == 2.69
    assert table.gpu_rate("runpod-secure", "L40S").usd_per_hour == 1.09
    assert table.gpu_rate("aws", "H100-SXM").usd_per_hour == 6.88


# --------------------------------------------------------------------------- lookups


def test_unknown_key_suggests_close_matches(table: PriceTable) -> None:
    with pytest.raises(UnknownPriceError) as info:
        table.chat_price("openai/gpt-4o-mimi")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigurationError)
    assert "openai/gpt-4o-mini" in str(info.value)
    assert "ledger.prices.chat" in str(info.value)
    with pytest.raises(KeyError, match="H100-SXM"):
        table.gpu_rate("aws", "H100")
    with pytest.raises(KeyError, match="provider/model"):
        table.embedding_price("text-embedding-3-small")


def test_unknown_key_error_survives_pickling(table: PriceTable) -> None:
    with pytest.raises(UnknownPriceError) as info:
        table.cpu_rate("generic/64 vCPU")
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is UnknownPriceError and str(again) == str(info.value)


def test_lookups_forgive_case(table: PriceTable) -> None:
    assert table.chat_price("OpenAI/GPT-4o-mini").model == "gpt-4o-mini"
    assert table.gpu_rate("AWS", "h100-sxm").usd_per_hour == 6.88


def test_batch_discount_is_zero_without_a_batch_api(table: PriceTable) -> None:
    assert table.batch_discount("openai") == 0.5
    assert table.batch_discount("groq") == 0.0


# --------------------------------------------------------------------------- bad files


def load_bad(tmp_path: Path, raw: Raw) -> tuple[str, list[str]]:
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigurationError) as info:
        load_price_table(path)
    return str(info.value), path.read_text().splitlines()


def _negative(r: Raw) -> None:
    r["chat"][1]["output"] = -1.0


def _no_source(r: Raw) -> None:
    del r["chat"][0]["source"]


def _unknown_field(r: Raw) -> None:
    r["gpu"][0]["usd_per_hr"] = 1.0


def _discount(r: Raw) -> None:
    r["batch_discounts"][3]["discount"] = 1.5


def _duplicate(r: Raw) -> None:
    r["chat"].append({**r["chat"][0], "output": 0.5})


def _source_key(r: Raw) -> None:
    r["embedding"][2]["source"] = "XX"


def _bad_date(r: Raw) -> None:
    r["cpu"][0]["date"] = "22/11/2026"


def _dangling_default(r: Raw) -> None:
    r["defaults"]["generate_comparators"][1] = "openai/gpt-4.1-nanoo"


def _text_price(r: Raw) -> None:
    r["embedding"][0]["input"] = "0.02 USD"


BAD: list[tuple[str, Callable[[Raw], None], str, str]] = [
    ("negative", _negative, "chat[1] (openai/gpt-4o) output: must be >= 0 (got -1.0)", "output"),
    (
        "no source",
        _no_source,
        "chat[0] (openai/gpt-4o-mini) source: missing; add it",
        "provider: openai",
    ),
    (
        "unknown field",
        _unknown_field,
        "gpu[0] (aws/H100-SXM) usd_per_hr: unknown field (did you mean 'usd_per_hour'?)",
        "usd_per_hr",
    ),
    (
        "discount",
        _discount,
        "batch_discounts[3] (together) discount: must be <= 1 (got 1.5)",
        "discount",
    ),
    (
        "duplicate",
        _duplicate,
        "chat[27] (openai/gpt-4o-mini): same key as chat[0] (openai/gpt-4o-mini)",
        "provider",
    ),
    (
        "source key",
        _source_key,
        "embedding[2] (google/gemini-embedding-001) source: 'XX' is not a key of sources",
        "source",
    ),
    ("date", _bad_date, "cpu[0] (generic/2 vCPU) date: write the date as YYYY-MM-DD", "date"),
    (
        "default",
        _dangling_default,
        "defaults.generate_comparators[1]: 'openai/gpt-4.1-nanoo' is not a chat row; "
        "did you mean openai/gpt-4.1-nano",
        "openai/gpt-4.1-nanoo",
    ),
    (
        "text price",
        _text_price,
        "embedding[0] (openai/text-embedding-3-small) input: must be a number",
        "input",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "expected", "on_line"), BAD, ids=[b[0] for b in BAD])
def test_bad_table_names_file_row_and_field(
    tmp_path: Path,
    raw: Raw,
    case: str,
    mutate: Callable[[Raw], None],
    expected: str,
    on_line: str,
) -> None:
    mutate(raw)
    message, lines = load_bad(tmp_path, raw)
    found = re.search(rf"{re.escape(str(tmp_path / 'prices.yaml'))}:(\d+): (.*)", message)
    assert found, message
    assert expected in found.group(2), message
    # The line number points into the offending row.
    assert on_line in lines[int(found.group(1)) - 1], (message, lines[int(found.group(1)) - 1])


def test_every_problem_is_reported_at_once(tmp_path: Path, raw: Raw) -> None:
    _negative(raw)
    _discount(raw)
    message, _ = load_bad(tmp_path, raw)
    assert "chat[1] (openai/gpt-4o) output" in message
    assert "batch_discounts[3] (together) discount" in message


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("version: '1'\nchat: [\n  {provider: openai\n")
    with pytest.raises(ConfigurationError, match=r"mine\.yaml:\d+: not valid YAML"):
        load_price_table(path)


def test_missing_file_and_non_mapping_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"nowhere\.yaml: no such price table"):
        load_price_table(tmp_path / "nowhere.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigurationError, match=r"list\.yaml: a price table is a mapping"):
        load_price_table(path)


def test_another_file_of_the_same_format_loads(tmp_path: Path, raw: Raw) -> None:
    raw["version"] = "mine-1"
    raw["gpu"][0]["usd_per_hour"] = 5.0
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(raw))
    table = load_price_table(str(path))
    assert table.version == "mine-1"
    assert table.gpu_rate("aws", "H100-SXM").usd_per_hour == 5.0


# --------------------------------------------------------------------------- overrides


def test_overrides_replace_rows_with_the_same_key_and_add_new_ones(table: PriceTable) -> None:
    before = copy.deepcopy(table.model_dump())
    merged = table.merged(
        {
            "gpu": [
                {
                    "provider": "lambda",
                    "gpu": "H100-SXM",
                    "instance": "1x",
                    "usd_per_hour": 3.5,
                    "source": "job: our reserved rate",
                    "date": "2026-12-01",
                },
                {
                    "provider": "onprem",
                    "gpu": "L4",
                    "usd_per_hour": 0.3,
                    "source": "job",
                    "date": "2026",
                },
            ],
            "chat": [
                {
                    "provider": "acme",
                    "model": "tiny-1",
                    "input": 0.01,
                    "output": 0.02,
                    "source": "ACME",
                    "date": "2026-11",
                }
            ],
            "sources": {"ACME": "acme.example/pricing, read 2026-11-30"},
        }
    )
    assert merged.gpu_rate("lambda", "H100-SXM").usd_per_hour == 3.5
    assert merged.gpu_rate("lambda", "H100-SXM", "8x").usd_per_hour == 3.99
    assert len(merged.gpu) == len(table.gpu) + 1
    assert merged.gpu_rate("onprem", "L4").usd_per_hour == 0.3
    assert merged.chat_price("acme/tiny-1").output == 0.02
    assert merged.version == "2026-11-22+overrides"
    # The packaged table is untouched.
    assert table.model_dump() == before
    assert table.gpu_rate("lambda", "H100-SXM").usd_per_hour == 4.29


def test_an_override_without_instance_wins_the_plain_lookup(table: PriceTable) -> None:
    row = {
        "provider": "lambda",
        "gpu": "H100-SXM",
        "usd_per_hour": 2.0,
        "source": "job",
        "date": "2026",
    }
    assert table.merged({"gpu": [row]}).gpu_rate("lambda", "H100-SXM").usd_per_hour == 2.0


def test_overrides_get_the_same_validation(table: PriceTable) -> None:
    bad = {
        "chat": [
            {
                "provider": "openai",
                "model": "gpt-4o",
                "input": 1,
                "output": -2,
                "source": "job",
                "date": "2026",
            }
        ],
        "batch_discounts": [
            {
                "provider": "groq",
                "discount": 1.5,
                "turnaround": "24 h",
                "source": "job",
                "date": "2026",
            }
        ],
    }
    with pytest.raises(ConfigurationError) as info:
        table.merged(bad)
    message = str(info.value)
    assert "ledger.prices: chat[0] (openai/gpt-4o) output: must be >= 0 (got -2)" in message
    assert "ledger.prices: batch_discounts[0] (groq) discount: must be <= 1 (got 1.5)" in message

    unsourced = {"provider": "x", "model": "y", "input": 1, "output": 1, "date": "2026"}
    with pytest.raises(ConfigurationError, match=r"chat\[0\] \(x/y\) source: missing"):
        table.merged({"chat": [unsourced]})
    with pytest.raises(ConfigurationError, match=r"chat\[1\] \(x/y\): same key as chat\[0\]"):
        row = {**unsourced, "source": "job"}
        table.merged({"chat": [row, row]})
    with pytest.raises(ConfigurationError, match=r"'quote' is not a key of sources"):
        table.merged({"chat": [{**unsourced, "source": "quote from sales"}]})
    with pytest.raises(ConfigurationError, match=r"'chats' \(did you mean 'chat'\?\)"):
        table.merged({"chats": []})


# --------------------------------------------------------------------------- costs


def test_api_cost_at_list_and_batch_price(table: PriceTable) -> None:
    mini = table.chat_price("openai/gpt-4o-mini")
    list_usd = api_cost(mini, 1_000_000, 1_000_000)
    assert list_usd == pytest.approx(0.75)  # 0.15 + 0.60
    assert list_usd * (1 - table.batch_discount("openai")) == pytest.approx(0.375)
    # 2,000 rows of 500 tokens in, 100 out: 1M x 0.15 + 0.2M x 0.60 = 0.15 + 0.12
    assert api_cost(mini, 2_000 * 500, 2_000 * 100) == pytest.approx(0.27)


def test_cached_input_is_part_of_input(table: PriceTable) -> None:
    mini = table.chat_price("openai/gpt-4o-mini")
    # 0.6M uncached x 0.15 + 0.4M cached x 0.075 = 0.09 + 0.03
    assert api_cost(mini, 1_000_000, 0, cached_input_tokens=400_000) == pytest.approx(0.12)
    host = table.chat_price("together/Llama-3.1-8B-Instruct-Turbo")  # no cached price
    assert api_cost(host, 1_000_000, 0, cached_input_tokens=500_000) == pytest.approx(0.18)
    with pytest.raises(ValueError, match="part of input_tokens"):
        api_cost(mini, 10, 0, cached_input_tokens=11)
    with pytest.raises(ValueError, match="output_tokens must be >= 0"):
        api_cost(mini, 10, -1)


def test_embedding_cost(table: PriceTable) -> None:
    small = table.embedding_price("openai/text-embedding-3-small")
    assert embedding_cost(small, 2_500_000) == pytest.approx(0.05)  # 2.5 x 0.02
    assert embedding_cost(small, 0) == 0.0
