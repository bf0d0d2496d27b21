"""`python -m cryopick`: the same CLI as the `cryopick` command."""

from cryopick.cli import main

if __name__ == "__main__":
    main()
