"""`python -m d2v`: the d2v command."""
import os
import sys

# python -m puts the working directory first on sys.path. In a d2v checkout that makes its top-level kernels/ folder
# (installed as d2v.kernels) importable as `kernels`, where transformers looks for the Hugging Face package of that
# name: `--init-from` a transformers directory or an export's hf/ layout would then fail to import transformers.
# d2v itself is already imported from where it is installed, so the entry can go.
if sys.path and os.path.isfile(os.path.join(sys.path[0] or os.getcwd(), "kernels", "regression_loss.py")):
    del sys.path[0]

from d2v.cli import main  # noqa: E402

main()
