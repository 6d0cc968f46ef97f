"""Private incremental build of part of the extension, for working on one op family.

    python scripts/dev_build.py attention [--cuda] [--out DIR]
    LLMKERNELS_EXT_PATH=$(python scripts/dev_build.py attention --print-path) pytest tests/attention

Compiles csrc/registration.cpp, csrc/common and csrc/<family> (CPU sources; .cu too with --cuda, for
sm_90a only) into DIR (default /tmp/llmk-dev-<family>), separate from setup.py's build/ so that several
people can build at once. LLMKERNELS_EXT_PATH makes `import llmkernels` load that library instead of
llmkernels._C. setup.py stays the one real build: this reuses its flags and source globs.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.build_config import ROOT, cxx_flags, cxx_runtime_link_args, find_cuda_home, nvcc_flags, sources  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="+", help="folders under csrc/ (attention, ternary, scan, ...)")
    ap.add_argument("--cuda", action="store_true", help="also compile the .cu sources (sm_90a)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--print-path", action="store_true", help="print only the library's path")
    args = ap.parse_args()
    for fam in args.families:  # an unknown name would build a library with no kernels of that family
        if not os.path.isdir(os.path.join(ROOT, "csrc", fam)):
            known = sorted(
                d for d in os.listdir(os.path.join(ROOT, "csrc")) if os.path.isdir(os.path.join(ROOT, "csrc", d))
            )
            ap.error(f"no folder csrc/{fam}; families: {', '.join(d for d in known if d != 'common')}")

    home = find_cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension  # imports torch: cxx_runtime_link_args finds its libstdc++

    name = "llmk_dev_" + "_".join(args.families) + ("_cuda" if args.cuda else "")
    out = args.out or f"/tmp/llmk-dev/{name}"
    os.makedirs(out, exist_ok=True)
    src = ["csrc/registration.cpp"] + [s for s in sources("*.cpp", "common")]
    for fam in args.families:
        src += sources("*.cpp", fam)
        if args.cuda:
            src += sources("*.cu", fam)
    if args.cuda:
        if home is None:
            sys.exit("no CUDA toolkit found")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", "1")
    quiet = args.print_path
    cpp_extension.load(
        name=name,
        sources=[os.path.join(ROOT, s) for s in src],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=cxx_flags(with_cuda=args.cuda),
        extra_cuda_cflags=nvcc_flags() if args.cuda else None,
        extra_ldflags=["-fopenmp", *cxx_runtime_link_args()],
        build_directory=out,
        is_python_module=False,
        with_cuda=args.cuda,
        verbose=not quiet,
    )
    print(os.path.join(out, name + ".so"))


if __name__ == "__main__":
    main()
