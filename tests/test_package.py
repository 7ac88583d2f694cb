"""The package namespace: what ``import tacdiff`` gives a user, in a fresh interpreter."""

import subprocess
import sys

import tacdiff


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_submodules_load_on_first_use_as_the_readme_uses_them():
    out = _run("import tacdiff, sys\n"
               "print('torch' in sys.modules)\n"
               "print(callable(tacdiff.io.load_quantized), tacdiff.models.reference.LATENT_REFERENCE_DIR.name)\n"
               "print(callable(tacdiff.backends.use_backend), callable(tacdiff.quantize))")
    assert out.split() == ["False", "True", "latent-reference-fmnist", "True", "True"]


def test_an_unknown_name_is_an_attribute_error():
    out = _run("import tacdiff\n"
               "for name in ('no_such_module', '__wrapped__'):\n"
               "    try:\n"
               "        getattr(tacdiff, name)\n"
               "    except AttributeError as error:\n"
               "        print(error)")
    assert out.splitlines() == ["module 'tacdiff' has no attribute 'no_such_module'",
                                "module 'tacdiff' has no attribute '__wrapped__'"]


def test_the_command_line_prints_the_package_version():
    result = subprocess.run([sys.executable, "-m", "tacdiff", "--version"], capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stdout) == (0, f"tacdiff {tacdiff.__version__}\n")
