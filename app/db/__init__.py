"""Storage: the `StoryRepository` contract (`repository`) and its two stores, `postgres`
and `sqlite`, each imported only where it is chosen."""
