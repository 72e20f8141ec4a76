"""Compile the gateway's per-request modules to C extensions with mypyc.

The gateway's cost per request is Python bytecode (perf: ~73% of its CPU in
libpython), spread over a dozen modules with no single hot spot. mypyc compiles
those type-checked modules to C from the same source; the `.py` files stay the
fallback. The result goes to `.build/native/` with a
manifest of the sources' digest: `gateway/native.py` uses it only while the
digest matches, so an edited module can never be shadowed by a stale build.

    python scripts/build_native.py      # make setup runs this
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


def build(out: Path) -> None:
    from mypyc.build import mypycify  # dev dependency (mypy): only needed to build
    from setuptools import setup

    warnings.simplefilter("ignore")  # setuptools' notes on pyproject.toml, not about this build

    with tempfile.TemporaryDirectory(prefix="llamagate-native-") as tmp:
        staged = Path(tmp) / "lib"
        os.chdir(ROOT)  # mypy reads pyproject.toml's [tool.mypy] from here
        said = io.StringIO()  # mypy's notes and each compiler command: shown only on failure
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                setup(
                    name="llamagate-native",
                    ext_modules=mypycify([f"gateway/{name}.py" for name in COMPILED],
                                         opt_level="3", target_dir=str(Path(tmp) / "c")),
                    script_args=["--quiet", "build_ext", "--build-lib", str(staged),
                                 "--build-temp", str(Path(tmp) / "o")],
                )
        except BaseException:
            print(said.getvalue()[-4000:], file=sys.stderr)
            raise
        (staged / "manifest.json").write_text(manifest_for(ROOT / "gateway"))
        # swapped in whole: a half-written build is never what the gateway loads
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
        shutil.rmtree(old, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / BUILD_DIR,
                        help="where the build goes: BUILD_DIR beside the installed packages "
                             "when they are not this checkout (the images do this)")
    out = parser.parse_args().out.resolve()
    try:
        build(out)
    except (Exception, SystemExit) as exc:  # setuptools reports a failed compile as SystemExit
        print(f"build_native: not compiled ({exc}); the gateway runs as plain Python",
              file=sys.stderr)
        return 0
    print(f"build_native: {len(COMPILED)} modules compiled into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
