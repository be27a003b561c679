"""ML helpers that the reward service and the trainer share (the score head, its pooling and
padding), so that neither depends on the other: torch here, no transport."""
