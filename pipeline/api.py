"""The Python API: the job from a notebook, and its model stages on a Ray Dataset you already have.

    from pipeline.api import run_job, dry_run, caption_dataset

    summary = run_job("configs/demo.yaml", ["pruning.budget=16"], input="demo_out/corpus", output="demo_out/c16")
    print(dry_run("configs/demo.yaml", input="demo_out/corpus", output="demo_out/c16"))

    ds = ray.data.read_parquet("s3://bucket/my-manifest.parquet")        # columns: uri (+ id, question, ...)
    rows = caption_dataset(ds, "configs/demo.yaml", ["task=qa"])         # a Dataset of output rows
    rows.write_parquet("s3://bucket/my-answers/")                        # or keep transforming it

``run_job`` is exactly the command line's run (checks, resume, exactly-once parts, summary).
``caption_dataset`` adds the decode and inference stages only: your dataset, your writing, no
resume (that needs the job's output folder); its rows have the output schema (README).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    import ray.data

    from pipeline.run import Summary


def resolve(
    config: Config | str | Path | None,
    overrides: Sequence[str] = (),
    *,
    input: str | None = None,
    output: str | None = None,
) -> Config:
    """A validated Config from a Config, a YAML path or None (defaults), with overrides applied."""
    extra = [*overrides]
    if input is not None:
        extra.append(f"input.uri='{input}'")
    if output is not None:
        extra.append(f"output.uri='{output}'")
    if isinstance(config, Config):
        if not extra:
            return config
        data = config.model_dump(mode="json")
        from pipeline.config import apply_override, parse_override

        for text in extra:
            apply_override(data, *parse_override(text))
        return Config.model_validate(data)
    return load_config(config, extra)


def run_job(
    config: Config | str | Path | None,
    overrides: Sequence[str] = (),
    *,
    input: str | None = None,
    output: str | None = None,
    log=print,
) -> Summary:
    """Run the job as ``jobs/caption.py`` does; returns its Summary (``.lines()`` prints it).

    Raises ConfigError / SourceError / OSError for problems found before work, as the command line
    would report them with status 2."""
    from pipeline.run import run

    return run(resolve(config, overrides, input=input, output=output), log=log)


def dry_run(
    config: Config | str | Path | None,
    overrides: Sequence[str] = (),
    *,
    input: str | None = None,
    output: str | None = None,
) -> str:
    """What a run would do (the ``--dry-run`` text); starts nothing, writes nothing."""
    from pipeline.run import describe, prepare

    return "\n".join(describe(prepare(resolve(config, overrides, input=input, output=output))))


def caption_dataset(
    ds: ray.data.Dataset,
    config: Config | str | Path | None,
    overrides: Sequence[str] = (),
    *,
    uri_column: str = "uri",
    id_column: str | None = "id",
) -> ray.data.Dataset:
    """``ds`` with the job's decode and inference stages applied: one output row per input row.

    ``ds`` needs a ``uri_column`` (media URI or path); ``id_column`` (default ``id``; the URI when
    the column is absent), ``question``, ``answer`` and ``question_type`` are used when present
    (``task=qa`` needs ``question``). The model and config are checked here, before anything runs.
    """
    from pipeline.models import check_model
    from pipeline.run import add_model_stages, new_run_id

    config = resolve(config, overrides)
    if not config.model.path:
        raise ConfigError("model.path is not set: put it in the YAML or pass model.path=...")
    check_model(config)  # may set decode.twig to the model's twig/
    schema = ds.schema(fetch_if_missing=False)  # known without running anything for most sources
    if schema is not None and uri_column not in schema.names:
        raise ConfigError(
            f"caption_dataset: the dataset has no {uri_column!r} column (columns: {', '.join(schema.names)})"
        )
    ds = ds.map_batches(
        work_rows_of,
        fn_kwargs={"uri_column": uri_column, "id_column": id_column, "task": config.task},
        batch_format="pyarrow",
    )
    return add_model_stages(ds, config, new_run_id())


def work_rows_of(batch, uri_column: str, id_column: str | None, task: str):
    """A user's rows as the job's work rows (``schema.WORK_FIELDS``)."""
    import pyarrow as pa

    from pipeline.schema import WORK_FIELDS
    from pipeline.sources import work_row

    names = batch.column_names
    if uri_column not in names:
        raise ValueError(f"caption_dataset: the dataset has no {uri_column!r} column (columns: {', '.join(names)})")
    if task == "qa" and "question" not in names:
        raise ValueError(f"caption_dataset: task=qa needs a 'question' column (columns: {', '.join(names)})")
    columns = batch.to_pydict()
    ids = columns[id_column] if id_column and id_column in names else columns[uri_column]
    # Captions carry no question (as the job's sources build them); QA rows carry theirs.
    extra = ("question", "answer", "question_type") if task == "qa" else ()
    rows = [
        work_row(ids[i], columns[uri_column][i], *(columns[c][i] if c in names else None for c in extra))
        for i in range(batch.num_rows)
    ]
    return pa.Table.from_pylist(rows, schema=pa.schema(WORK_FIELDS))
