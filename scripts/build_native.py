"""Compile the gateway's per-request modules to C extensions with mypyc.

The gateway's cost per request is Python bytecode (perf: ~73% of its CPU in
libpython), spread over a dozen modules with no single hot spot. mypyc compiles
those type-checked modules to C from the same source; the `.py` files stay the
fallback. The result goes to `.build/native/` with a
manifest of the sources' digest: `gateway/native.py` uses it only while the
digest matches, so an edited module can never be shadowed by a stale build.

    python scripts/build_native.py      # make setup runs this; quick when up to date
    python scripts/build_native.py --out SITE_PACKAGES/.build/native   # an installed copy

Without a C compiler or Python's headers it says so and exits 0: the gateway
then runs as plain Python, slower but the same.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["LLAMAGATE_NATIVE"] = "0"  # importing gateway here must not load (or warn about) a build

from gateway.native import BUILD_DIR, COMPILED, manifest_for  # noqa: E402


def build(out: Path, manifest: str) -> None:
    from mypyc.build import mypycify  # dev dependency (mypy): only needed to build
    from setuptools import setup

    warnings.simplefilter("ignore")  # setuptools' notes on pyproject.toml, not about this build
    out.parent.mkdir(parents=True, exist_ok=True)
    # staged beside its destination, so the swap below is a rename, not a copy
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="llamagate-native-") as tmp:
            os.chdir(ROOT)  # mypy reads pyproject.toml's [tool.mypy] from here
            said = io.StringIO()  # mypy's notes and each compiler command: shown on failure
            try:
                with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                    setup(
                        name="llamagate-native",
                        ext_modules=mypycify([name.replace(".", "/") + ".py" for name in COMPILED],
                                             opt_level="3", target_dir=str(Path(tmp) / "c")),
                        script_args=["--quiet", "build_ext", "--build-lib", str(staged),
                                     "--build-temp", str(Path(tmp) / "o")],
                    )
            except BaseException:
                print(said.getvalue()[-4000:], file=sys.stderr)
                raise
        if manifest_for(ROOT) != manifest:  # the build may hold either version: keep neither
            raise RuntimeError("the sources changed during the build")
        (staged / "manifest.json").write_text(manifest)
        old = out.with_name(f".{out.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        staged.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / BUILD_DIR,
                        help="where the build goes: BUILD_DIR beside the installed packages "
                             "when they are not this checkout (the images do this)")
    parser.add_argument("--strict", action="store_true",
                        help="a build that fails is an error (exit 1), not a warning")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    manifest = manifest_for(ROOT)
    failed = out.with_name(f"{out.name}.failed")  # the manifest of sources that did not compile
    if _read(out / "manifest.json") == manifest:
        return 0  # up to date: make setup runs this every time
    if not args.strict and _read(failed) == manifest:
        print(f"build_native: not compiled (it failed for these sources; delete {failed} to "
              "try again); the gateway runs as plain Python", file=sys.stderr)
        return 0
    try:
        build(out, manifest)
    except (Exception, SystemExit) as exc:  # setuptools reports a failed compile as SystemExit
        print(f"build_native: not compiled ({exc}); the gateway runs as plain Python",
              file=sys.stderr)
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(manifest)
        return 1 if args.strict else 0
    failed.unlink(missing_ok=True)
    print(f"build_native: {len(COMPILED)} modules compiled into {out}")
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
