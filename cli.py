"""`python cli.py ...` from a source checkout (and `torchrun ... cli.py train`): the same program as `cli`."""
from bloodcells.cli import app, main  # noqa: F401

if __name__ == "__main__":
    main()
