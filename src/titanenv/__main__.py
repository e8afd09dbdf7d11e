"""``python -m titanenv``: the same as the ``titanenv`` command."""

from titanenv.cli import main

if __name__ == "__main__":
    main()
