"""`reftbench-compress RUN_DIR --out DIR`: the compressed checkpoint of a finished FineGates run."""
import argparse
import os
import sys

from ..errors import ReftbenchError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="reftbench-compress", description=__doc__)
    parser.add_argument("run_dir", help="a folder a finegates run wrote (result.json, intervention/)")
    parser.add_argument("--out", required=True, help="where to write the compressed checkpoint")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from . import compress_run, summary
    try:
        info = compress_run(args.run_dir, args.out)
    except ReftbenchError as e:
        print(f"reftbench-compress: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    s = summary(info)
    print(f"compressed {args.run_dir} -> {args.out}: {s['params_dense']:,} -> {s['params_compressed']:,} params "
          f"({100 * s['params_removed_total'] / s['params_dense']:.1f}% of the model removed); "
          f"non-embedding Linear weights removed: {100 * s['removed_cascade_share_linear']:.1f}%; gated weights "
          f"removed: {100 * s['removed_cascade_share_gated']:.1f}% (physically), "
          f"{100 * s['removed_per_layer_share_gated']:.1f}% (per layer, the authors' count)")


if __name__ == "__main__":
    main()
