"""``python -m marble_lightning ...`` runs the ``marble`` command line (see
:mod:`marble_lightning.cli`)."""

from marble_lightning.cli import main

if __name__ == "__main__":
    main()
