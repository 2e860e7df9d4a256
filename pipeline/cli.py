"""Caption images and videos, or answer questions about them, into Parquet.

    python jobs/caption.py --config configs/demo.yaml [--input URI] [--output URI] [key=value ...]
    ray job submit --working-dir . -- python jobs/caption.py --config configs/X.yaml ...

Overrides are dotted config keys, e.g. ``pruning.method=vispruner pruning.budget=64 task=qa``.
The config, the input, the output and the model are checked before any cluster work; a problem
exits with status 2 and one message naming it. Rerunning the same command skips items already
written for the same config, so a killed or scheduled run just picks up where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import Config, ConfigError, load_config


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--input", help="input URI: prefix/directory, manifest or annotation file (input.uri)")
    parser.add_argument("--output", help="output directory or prefix for Parquet parts (output.uri)")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print N rows of this config's output")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"input.uri={args.input}")
    if args.output:
        overrides.append(f"output.uri={args.output}")
    # Values are YAML-parsed; URIs must stay strings even if they look like numbers.
    overrides = [_quote_uri(o) for o in overrides]
    return load_config(args.config, overrides), args


def _quote_uri(text: str) -> str:
    key, _, value = text.partition("=")
    if key.strip() in ("input.uri", "output.uri", "model.path", "input.media_prefix", "input.answers_uri"):
        escaped = value.replace("'", "''")
        return f"{key}='{escaped}'"
    return text


def main(argv: list[str] | None = None) -> int:
    from pipeline.run import main_exit_code, run
    from pipeline.sources import SourceError

    try:
        config, args = parse_args(argv)
        summary = run(config)
    except (ConfigError, SourceError, PermissionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.show:
        show_rows(config, args.show)
    return main_exit_code(summary)


def show_rows(config: Config, count: int) -> None:
    """A few rows of this config's output, and how to query all of it."""
    from pipeline import sink
    from pipeline.run import options_for

    rows = [
        r
        for r in sink.read_output(config.output.uri, options_for(config.output.uri, config)).to_pylist()
        if r["config_fingerprint"] == config.fingerprint()
    ]
    rows.sort(key=lambda r: (r["status"] != "ok", r["item_id"]))
    for r in rows[:count]:
        detail = r["text"] if r["status"] == "ok" else f"{r['error_kind']}: {r['error']}"
        tokens = f"{r['visual_tokens_kept']}/{r['visual_tokens_total']} visual tokens"
        print(f"\n{r['item_id']} [{r['media_type']}, {tokens}]")
        print(f"  {detail}")
    if "://" not in config.output.uri:
        query = f"SELECT status, count(*) FROM '{config.output.uri}/*.parquet' GROUP BY status"
        print(f'\nquery it: python -c "import duckdb; duckdb.sql(\\"{query}\\").show()"')


if __name__ == "__main__":
    sys.exit(main())
