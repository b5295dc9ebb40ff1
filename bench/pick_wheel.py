"""Pick a prebuilt CUDA wheel of sharpfused for this machine from a folder (bench/wheels/).

bench/build_cuda_wheel.sh names its wheels ``sharpfused-0.1.0+torch2.11.cu130-cp312-cp312-linux_x86_64.whl``:
the local label says the torch minor and the CUDA version the extension was compiled against.
A wheel is picked when, for the machine's torch, python and (optionally) GPU:

* its label's torch major.minor is the installed torch's, and its ``cuNNN`` is ``torch.version.cuda``;
* its python and ABI tags are the interpreter's (``cp312``) and its platform is Linux on this CPU;
* it holds the extension (``sharpfused/_C*.so``);
* its ``sharpfused/csrc`` sources are this checkout's ``csrc/`` (``--csrc``): a wheel built from
  other kernel sources would test stale kernels;
* with ``--arch 9.0``: its sidecar ``<wheel>.txt`` (``arch_list:``) covers that GPU (SASS of the
  same major and a minor not above it, or PTX of an arch not above it).

Among several, the newest file wins. CLI: prints the wheel's path and exits 0, or prints nothing on
stdout and exits 1 (then the caller builds); the reasons go to stderr, one line per wheel refused.
``--self-check`` runs the selection on fake wheels in a temp dir (both outcomes) for the CPU dry run
of bench/gpu_check.sh. No torch is needed when ``--torch``, ``--cuda`` and ``--python-tag`` are given.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

#: the files of csrc/ that a wheel ships as sharpfused/csrc (setup.py's CSRC_FILES)
CSRC_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")
WHEEL_RE = re.compile(r"^(?P<dist>sharpfused)-(?P<version>[^-]+)-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")
LABEL_RE = re.compile(r"^[^+]+\+torch(?P<torch>\d+\.\d+)\.cu(?P<cuda>\d+)$")


def torch_minor(version: str) -> str:
    """``2.11.0+cu130`` -> ``2.11``."""
    return ".".join(version.split("+")[0].split(".")[:2])


def cuda_tag(cuda: str) -> str:
    """``13.0`` -> ``cu130``."""
    return "cu" + cuda.replace(".", "")


def python_tag() -> str:
    return f"cp{sys.version_info[0]}{sys.version_info[1]}"


def machine_platform() -> str:
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def parse_name(name: str) -> Optional[dict]:
    """The parts of a CUDA wheel's file name, or None when it is not one (no +torchX.Y.cuNNN label)."""
    m = WHEEL_RE.match(name)
    if not m:
        return None
    label = LABEL_RE.match(m["version"])
    if not label:
        return None
    return {**m.groupdict(), "torch": label["torch"], "cuda": "cu" + label["cuda"]}


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()[:16]


def csrc_digest(csrc: Path) -> str:
    """A digest of the checkout's kernel sources (the top level of csrc/, as a wheel ships them)."""
    return _digest({p.name: p.read_bytes() for p in Path(csrc).iterdir() if p.is_file() and p.suffix in CSRC_SUFFIXES})


def wheel_contents(wheel: Path) -> tuple[list[str], str]:
    """(the extension's members, the digest of the wheel's sharpfused/csrc sources)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        sos = [n for n in names if re.fullmatch(r"sharpfused/_C\.[^/]*\.so", n)]
        src = {
            n.rsplit("/", 1)[1]: z.read(n)
            for n in names
            if n.startswith("sharpfused/csrc/") and n.count("/") == 2 and n.endswith(CSRC_SUFFIXES)
        }
    return sos, _digest(src)


def read_sidecar(wheel: Path) -> dict[str, str]:
    """bench/build_cuda_wheel.sh's ``<wheel>.txt``: ``key: value`` lines (empty when absent)."""
    side = wheel.with_name(wheel.name + ".txt")
    if not side.is_file():
        return {}
    out = {}
    for line in side.read_text().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def arch_covers(arch_list: str, arch: str) -> bool:
    """Whether code built for TORCH_CUDA_ARCH_LIST ``arch_list`` runs on a GPU of capability ``arch``."""
    want = tuple(int(x) for x in arch.split("."))
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        base = entry.removesuffix("+PTX")
        try:
            have = tuple(int(x) for x in base.split("."))
        except ValueError:
            continue
        if have[0] == want[0] and have[1] <= want[1]:  # SASS: same major, minor not above
            return True
        if entry.endswith("+PTX") and have <= want:  # PTX: JIT-compiled for any newer GPU
            return True
    return False


def check(
    wheel: Path,
    torch_version: str,
    cuda: Optional[str],
    py_tag: str,
    plat: Optional[str] = None,
    csrc: Optional[Path] = None,
    arch: Optional[str] = None,
) -> Optional[str]:
    """Why ``wheel`` does not fit this machine, or None when it does."""
    parts = parse_name(wheel.name)
    if parts is None:
        return "not a CUDA wheel of sharpfused (no +torchX.Y.cuNNN version label)"
    if not cuda:
        return f"this torch ({torch_version}) has no CUDA"
    if parts["torch"] != torch_minor(torch_version):
        return f"built for torch {parts['torch']}, this torch is {torch_version}"
    if parts["cuda"] != cuda_tag(cuda):
        return f"built for {parts['cuda']}, this torch has CUDA {cuda} ({cuda_tag(cuda)})"
    if parts["py"] != py_tag or parts["abi"] != py_tag:
        return f"built for {parts['py']}-{parts['abi']}, this python is {py_tag}"
    plat = plat or machine_platform()
    m_arch = plat.split("_", 1)[1] if "_" in plat else plat
    if not (parts["plat"].startswith(("linux_", "manylinux")) and parts["plat"].endswith(m_arch)):
        return f"built for platform {parts['plat']}, this machine is {plat}"
    try:
        sos, digest = wheel_contents(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        return f"unreadable: {exc}"
    if len(sos) != 1:
        return f"holds {len(sos)} sharpfused/_C*.so, expected one"
    if csrc is not None and Path(csrc).is_dir() and digest != csrc_digest(Path(csrc)):
        return f"built from other kernel sources than {csrc}/ (stale: rebuild with bench/build_cuda_wheel.sh)"
    if arch:
        archs = read_sidecar(wheel).get("arch_list")
        if archs and not arch_covers(archs, arch):
            return f"built for TORCH_CUDA_ARCH_LIST={archs}, which does not cover this GPU ({arch})"
    return None


def pick(
    directory: Path,
    torch_version: str,
    cuda: Optional[str],
    py_tag: str,
    plat: Optional[str] = None,
    csrc: Optional[Path] = None,
    arch: Optional[str] = None,
) -> tuple[Optional[Path], list[tuple[str, str]]]:
    """(the newest fitting wheel or None, [(wheel name, why refused)])."""
    directory = Path(directory)
    wheels = sorted(directory.glob("sharpfused-*.whl"), key=lambda p: p.stat().st_mtime, reverse=True)
    refused, chosen = [], None
    for w in wheels:
        why = check(w, torch_version, cuda, py_tag, plat, csrc, arch)
        if why is None and chosen is None:
            chosen = w
        elif why is not None:
            refused.append((w.name, why))
    return chosen, refused


def fake_wheel(
    directory: Path, version: str, py_tag: str, plat: str, csrc: Optional[Path], stale: bool = False
) -> Path:
    """A wheel-shaped zip with an (empty) extension and csrc sources: enough for :func:`pick`."""
    path = Path(directory) / f"sharpfused-{version}-{py_tag}-{py_tag}-{plat}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"sharpfused/_C.cpython-{py_tag[2:]}-x86_64-linux-gnu.so", b"")
        z.writestr(f"sharpfused-{version}.dist-info/METADATA", f"Name: sharpfused\nVersion: {version}\n")
        if csrc is not None:
            for p in sorted(Path(csrc).iterdir()):
                if p.is_file() and p.suffix in CSRC_SUFFIXES:
                    data = p.read_bytes() + (b"\n// changed\n" if stale else b"")
                    z.writestr(f"sharpfused/csrc/{p.name}", data)
    return path


def self_check(csrc: Optional[Path], torch_version: str = "2.11.0+cu130", cuda: str = "13.0",
               py_tag: str = "cp312", plat: str = "linux_x86_64") -> tuple[bool, str]:  # fmt: skip
    """Both outcomes of the selection on fake wheels, without a GPU: (ok, one-line summary)."""
    label = f"torch{torch_minor(torch_version)}.{cuda_tag(cuda)}"
    other = f"cp{int(py_tag[2:]) + 1}" if py_tag.startswith("cp") else "cp399"
    with tempfile.TemporaryDirectory() as tmp:
        present, decoys, empty = (Path(tmp) / d for d in ("present", "decoys", "empty"))
        for d in (present, decoys, empty):
            d.mkdir()
        bad = [
            fake_wheel(decoys, "0.1.0+torch2.99.cu130", py_tag, plat, csrc),
            fake_wheel(decoys, f"0.1.0+torch{torch_minor(torch_version)}.cu999", py_tag, plat, csrc),
            fake_wheel(decoys, f"0.1.0+{label}", other, plat, csrc),
            fake_wheel(decoys, "0.1.0", py_tag, plat, csrc),
        ]
        if csrc is not None:
            bad.append(fake_wheel(decoys, f"0.1.0+{label}", py_tag, "manylinux_2_28_x86_64", csrc, stale=True))
        good = fake_wheel(present, f"0.1.0+{label}", py_tag, plat, csrc)
        for b in bad:
            (present / b.name).write_bytes(b.read_bytes())
        got, refused = pick(present, torch_version, cuda, py_tag, plat, csrc)
        none_d, ref_d = pick(decoys, torch_version, cuda, py_tag, plat, csrc)
        none_e, _ = pick(empty, torch_version, cuda, py_tag, plat, csrc)
        ok = got is not None and got.name == good.name and none_d is None and none_e is None
        ok = ok and len(refused) == len(bad) and len(ref_d) == len(bad)
        summary = (
            f"wheel present: picks {got.name if got else 'NONE'} over {len(refused)} decoys "
            f"(other torch, CUDA, python, no label{', stale csrc' if csrc is not None else ''}); "
            f"decoys only: {'build' if none_d is None else 'picked ' + none_d.name}; "
            f"empty folder: {'build' if none_e is None else 'picked ' + none_e.name}"
        )
    return ok, summary


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "wheels")
    ap.add_argument("--torch", help="torch version [the installed torch's]")
    ap.add_argument("--cuda", help="torch's CUDA version, e.g. 13.0 [torch.version.cuda]")
    ap.add_argument("--python-tag", default=python_tag(), help="e.g. cp312 [this interpreter's]")
    ap.add_argument("--platform", default=machine_platform())
    ap.add_argument("--csrc", type=Path, help="the checkout's csrc/: refuse wheels built from other sources")
    ap.add_argument("--arch", help="the GPU's capability, e.g. 9.0: refuse wheels that do not cover it")
    ap.add_argument("--self-check", action="store_true", help="the selection on fake wheels (no GPU, no torch)")
    args = ap.parse_args(argv)
    if args.self_check:
        ok, summary = self_check(args.csrc)
        print(("ok: " if ok else "FAIL: ") + summary)
        return 0 if ok else 1
    if args.torch is None:  # probe this machine's torch (with --torch, --cuda is as given: none = a CPU torch)
        try:
            import torch
        except ImportError:
            print("pick_wheel: torch is not importable: no wheel can be matched", file=sys.stderr)
            return 1
        args.torch = str(torch.__version__)
        args.cuda = args.cuda or torch.version.cuda
    got, refused = pick(args.dir, args.torch, args.cuda, args.python_tag, args.platform, args.csrc, args.arch)
    for name, why in refused:
        print(f"pick_wheel: refused {name}: {why}", file=sys.stderr)
    here = f"torch {args.torch}, CUDA {args.cuda}, {args.python_tag}, {args.platform}"
    if got is None:
        print(f"pick_wheel: no wheel in {args.dir} for {here} ({len(refused)} refused)", file=sys.stderr)
        return 1
    print(f"pick_wheel: {got.name} fits {here}", file=sys.stderr)
    print(got)
    return 0


if __name__ == "__main__":
    sys.exit(main())
