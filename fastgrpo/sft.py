"""``python -m fastgrpo.sft``: the warm-up stage, supervised fine-tuning of the built-in task's
tiny model (``fastgrpo.trainer.sft``)."""

from fastgrpo.trainer.sft import main

if __name__ == "__main__":
    main()
