"""Training the seed's model bit for bit: the model and its loss, the update rules' steps and replays (``adamw``),
the determinism check, the host copies and memory of a step, the data order, the resume state (``checkpoint``,
``resume_lock``), and the training loop that hands each step to the recorder (``thimble.record.writer``)."""
