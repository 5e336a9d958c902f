"""The one exception type for requests that cannot be served as given."""


class InputError(ValueError):
    """The request cannot be served as given (the message says why): answered 400; nothing changed."""
