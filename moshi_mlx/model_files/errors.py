"""The errors of finding and loading model files: each message says what to do."""


class ModelFilesError(Exception):
    """A model file that cannot be found, downloaded or used; the message says what to do."""


class HubUnreachable(ModelFilesError):
    """The Hub could not be reached and the file is not in the local cache."""


class HubFileMissing(ModelFilesError):
    """The repository exists but has no such file."""
