"""`python -m dilatedseg ...`: the `dilatedseg` command."""

from dilatedseg.cli import main

if __name__ == "__main__":  # (DDP starts its other processes as python -m dilatedseg too)
    main()
