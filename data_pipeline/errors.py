"""The project's error types for what a user fixes: bad input data (names the file, the row or line, and the
field) and an output that could not be written (disk full, quota, read-only: names the file)."""

from __future__ import annotations


class DataError(Exception):
    """Bad input. The CLI prints it as one line and exits non-zero; nothing partial is written."""

    def __init__(self, file: str, message: str, row: int | str | None = None, field: str | None = None):
        self.file, self.row, self.field, self.message = file, row, field, message
        where = file
        if row is not None:
            where += f", row {row}" if isinstance(row, int) else f", {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # Ray carries worker errors back pickled: rebuild from the fields, not the text
        return type(self), (self.file, self.message, self.row, self.field)


class WriteError(Exception):
    """An output file could not be written (ENOSPC, EDQUOT, EROFS, EACCES...). The CLI prints it as one line
    and exits 2; the stage's staged folder is discarded, so its previous output stays as it was."""

    def __init__(self, file: str, message: str):
        self.file, self.message = file, message
        super().__init__(f"{file}: {message}")

    def __reduce__(self):
        return type(self), (self.file, self.message)
