"""`python -m pyseqkern.info`: prints backend_info() for a person to read (or --json)."""
from __future__ import annotations

import argparse
import json
import sys


def _cache_rules(cpu: dict) -> str:
    """Which of the recurrent layers' cache rules apply (docs/DESIGN.md, "Caches by vendor")."""
    if not cpu["l3_streams_fast"]:
        return "slow-L3 (not AMD or Hygon; measured on Intel server cores)"
    if cpu["l2_outpaces_l3"]:
        return "Zen 5's (the L3 streams fast, at half the L2's rate)"
    return "AMD's (the L3 streams near the L2's rate)"


def format_info(info: dict) -> str:
    cpu, cuda, fb = info["cpu"], info["cuda"], info["reference_fallback"]
    lines = [
        f"pyseqkern {info['version']}  (torch {info['torch']}, {info['compiler']})",
        f"CPU   ISA active: {cpu['isa_active']} ({cpu['vector_bits']}-bit vectors)"
        + (f", forced by PYSEQKERN_CPU_ISA={cpu['isa_forced_by_env']}" if cpu["isa_forced_by_env"] else ""),
        f"      best here: {cpu['isa_best']}; CPU supports: {', '.join(cpu['isa_supported'])}; "
        f"compiled: {', '.join(cpu['isa_compiled'])}",
        f"      threads: {cpu['threads']} (torch.get_num_threads()), on {cpu['thread_pool']}",
        f"      vendor: {cpu['vendor'] or 'unknown'}"
        + (f" (family {cpu['family']:X}h)" if cpu["family"] else "") + "; "
        "torch's float32 GEMMs for recurrent layers: "
        + ("MKL's mm" if cpu["fp32_gemm"] == "mkl" else "oneDNN's linear"),
        "      cache rules: " + _cache_rules(cpu),
    ]
    if cuda["compiled"]:
        lines.append(f"CUDA  compiled: yes (toolkit {cuda['toolkit']}, archs {', '.join(cuda['archs'])})")
    else:
        lines.append("CUDA  compiled: no")
    if cuda["usable"]:
        lines.append(f"      usable: yes, on {cuda['device']}")
    else:
        lines.append(f"      usable: no: {cuda['reason']}")
    active = ", ".join(f"{op} ({why})" for op, why in fb["active_for"].items()) or "none"
    lines.append(
        f"Reference fallback: forced by PYSEQKERN_REFERENCE: {'yes' if fb['forced_by_env'] else 'no'}; "
        f"active for: {active}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyseqkern.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    args = parser.parse_args(argv)
    from . import backend_info

    info = backend_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
