"""The Hugging Face Hub: `hf://owner/repo/file` addresses and downloads through
huggingface_hub (its cache and progress bars), its errors turned into ones that say what to do."""

from pathlib import Path

from .errors import HubFileMissing, HubUnreachable, ModelFilesError

HF_PREFIX = "hf://"
FILE_PREFIX = "file://"  # Kyutai's run_tts takes file://path for a local file, as a path


def parse_hf_uri(uri: str) -> tuple[str, str]:
    """'hf://owner/repo/path/to/file' -> ('owner/repo', 'path/to/file')."""
    parts = uri.removeprefix(HF_PREFIX).split("/", 2)
    if not uri.startswith(HF_PREFIX) or len(parts) < 3 or not all(parts):
        raise ModelFilesError(f"'{uri}': expected hf://owner/repo/file")
    return f"{parts[0]}/{parts[1]}", parts[2]


def hub_download(repo_id: str, filename: str, local_only: bool = False) -> Path:
    """Downloads one file through huggingface_hub (its cache and progress bars), turning its
    errors into `ModelFilesError`s that say what to do."""
    # Imported here: huggingface_hub and its HTTP client cost every app's start ~50 ms, while
    # only a download needs them.
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    where = f"{repo_id}/{filename}"
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=local_only))
    except hub_errors.LocalEntryNotFoundError:
        raise HubUnreachable(
            f"cannot reach the Hugging Face Hub to download {where}, and it is not in the local "
            "cache. Check your connection (set HF_HUB_OFFLINE=1 to use cached files only), pass "
            "local files with --moshi-weight, --mimi-weight, --tokenizer and --lm-config, or try "
            "--demo, a small model that needs no download.") from None
    except hub_errors.GatedRepoError:
        raise ModelFilesError(
            f"{repo_id} is gated: accept its terms on huggingface.co and log in with "
            "`hf auth login`.") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelFilesError(
            f"repository {repo_id} not found on the Hugging Face Hub (or it is private: log in "
            "with `hf auth login`). Check --hf-repo or the hf:// address.") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelFilesError(f"{repo_id}: revision not found.") from None
    except hub_errors.EntryNotFoundError:
        raise HubFileMissing(f"{repo_id} has no file '{filename}'.") from None
    except hub_errors.HFValidationError as e:
        raise ModelFilesError(f"'{repo_id}': not a valid repository id ({e}).") from None
    except hub_errors.HfHubHTTPError as e:
        raise ModelFilesError(f"downloading {where} failed: {e}") from None
    except OSError as e:
        raise ModelFilesError(f"downloading {where} failed: {e}") from None
