"""``python -m fastgrpo.train``: StepGRPO training (``fastgrpo.trainer.loop``; ``--help`` lists
every option)."""

from fastgrpo.trainer.loop import main

if __name__ == "__main__":
    main()
