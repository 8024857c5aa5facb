"""cffi build script for the planner (out-of-line API mode).

Referenced from setup.py as ``cffi_modules=["native/build.py:ffibuilder"]``; setuptools
compiles every ``native/src/*.c`` into the private extension ``oobleck.planner._native``,
which exports only ``ffi`` and ``lib``. The declarations live in ``native/planner.cdef``,
mirroring ``native/include/oobleck_planner.h``.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _rel(path: Path) -> str:
    # setuptools wants source paths relative to setup.py's directory.
    return path.relative_to(ROOT).as_posix()


ffibuilder = FFI()
ffibuilder.cdef((HERE / "planner.cdef").read_text())
ffibuilder.set_source(
    "oobleck.planner._native",
    '#include "oobleck_planner.h"\n',
    sources=[_rel(p) for p in sorted((HERE / "src").glob("*.c"))],
    include_dirs=[_rel(HERE / "include"), _rel(HERE / "src")],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
