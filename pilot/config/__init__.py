"""Config ingestion: sources turn documents into API objects and feed the ConfigStore."""

from pilot.config.documents import DocumentError, LoadResult
from pilot.config.files import FileSource, load_dir, load_file, load_text
from pilot.config.store import ConfigStore

__all__ = ["ConfigStore", "DocumentError", "FileSource", "LoadResult", "load_dir", "load_file", "load_text"]
