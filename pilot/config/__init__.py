"""Config ingestion: sources turn documents into API objects and feed the ConfigStore."""

from pilot.config.documents import DocumentError, LoadResult
from pilot.config.files import FileSource
from pilot.config.store import ConfigStore
from pilot.config.yaml_dir import load_dir, load_file
from pilot.config.yaml_text import load_text

__all__ = ["ConfigStore", "DocumentError", "FileSource", "LoadResult", "load_dir", "load_file", "load_text"]
