"""The docs' generated tables are the code's: docs/parameters.md's the config fields' defaults and
help texts, docs/serving.md's conformance table the front door's fields (one source each)."""

from __future__ import annotations

from tests import parameter_docs


def test_the_parameter_tables_match_the_step_configs():
    page = parameter_docs.PAGE.read_text()
    assert parameter_docs.render(page) == page, (
        f"docs/parameters.md differs from phi3flow/core/config.py: run `{parameter_docs.COMMAND}`")


def test_each_table_lists_exactly_its_entry_points_parameters():
    for entry_point in parameter_docs.CONFIGS:
        rows = parameter_docs.table(entry_point).splitlines()[2:]
        listed = {row.split("`")[1] for row in rows}
        fields = {f.name for f in parameter_docs.config.cli_fields(
            parameter_docs.CONFIGS[entry_point])}
        assert listed == fields, entry_point


def test_the_conformance_table_matches_the_front_doors_fields():
    page = parameter_docs.SERVING.read_text()
    assert parameter_docs.render_serving(page) == page, (
        f"docs/serving.md differs from phi3flow/serving/front_door.py: run `{parameter_docs.COMMAND}`")
