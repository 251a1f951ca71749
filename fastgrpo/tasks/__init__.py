"""Built-in tasks (one package each: arithmetic, charts, routing) and the toolkit they share
(data readers, tokenizer helpers, tiny models).  Imports nothing: ``--task NAME`` loads
``fastgrpo.tasks.NAME`` only when a run asks for it."""
