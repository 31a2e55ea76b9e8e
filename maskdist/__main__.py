"""``python -m maskdist`` (and ``accelerate launch -m maskdist``) runs the CLI."""
from maskdist.cli import main

if __name__ == "__main__":
    main()
