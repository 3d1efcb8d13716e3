"""`dprdm retrieve` (being written)."""


def retrieve() -> None:
    raise NotImplementedError
