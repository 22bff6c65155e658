"""CSV ingest: what an upload's summary reports, what its rows hold, and how every bad file is rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from qubrid_lab.data.csv_ingest import CsvSummary, DatasetError, inspect_csv, read_rows
from qubrid_lab.errors import InvalidRequestError

DATA = Path(__file__).parent


def write(tmp_path: Path, content: str | bytes, name: str = "data.csv") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


def rejection(path: Path, filename: str = "data.csv") -> str:
    with pytest.raises(DatasetError) as caught:
        inspect_csv(path, filename)
    assert caught.value.status_code == 400
    assert caught.value.param == "file"
    return caught.value.message


def test_summary_counts_data_rows_and_file_bytes():
    summary = inspect_csv(DATA / "qa_facts.csv", "qa_facts.csv")

    assert summary == CsvSummary(
        row_count=15, columns=["question", "answer"], size_bytes=(DATA / "qa_facts.csv").stat().st_size
    )


def test_quoted_fields_with_commas_quotes_and_line_breaks_are_one_row_each(tmp_path):
    path = write(
        tmp_path,
        'question,answer\r\n"Where, exactly?","Line one\r\nline two, with ""quotes"""\r\nplain,row\r\n',
    )

    assert inspect_csv(path, "data.csv").row_count == 2
    assert read_rows(path) == [
        {"question": "Where, exactly?", "answer": 'Line one\nline two, with "quotes"'},
        {"question": "plain", "answer": "row"},
    ]


def test_shipped_text_dataset_keeps_its_multiline_row(tmp_path):
    rows = read_rows(DATA / "text_notes.csv")

    assert len(rows) == 3
    assert rows[1]["text"] == "Notes, kept by the gardener:\nwater the ferns on Tuesdays, and never the cactus."
    assert rows[2]["text"] == 'Visitors say the "glass garden" is warmest in January.'


def test_byte_order_mark_blank_lines_and_spaces_around_names_are_accepted(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf Question , Answer\n\nWhy?,Because.\n\n,\n\n")

    summary = inspect_csv(path, "DATA.CSV")

    assert summary.columns == ["Question", "Answer"]
    assert summary.row_count == 2
    assert summary.size_bytes == path.stat().st_size
    assert read_rows(path) == [{"Question": "Why?", "Answer": "Because."}, {"Question": "", "Answer": ""}]


def test_a_long_field_is_not_limited_by_the_csv_module_default(tmp_path):
    document = "word " * 40_000
    path = write(tmp_path, f'text\n"{document}"\n')

    assert read_rows(path) == [{"text": document}]


def test_dataset_error_is_an_invalid_request():
    assert issubclass(DatasetError, InvalidRequestError)


@pytest.mark.parametrize("filename", ["data.xlsx", "data.csv.txt", "data", "data.tsv"])
def test_wrong_extension_is_rejected_naming_the_file(tmp_path, filename):
    path = write(tmp_path, "text\nhello\n")

    message = rejection(path, filename)

    assert f"'{filename}'" in message and ".csv" in message and "Only CSV" in message


def test_invalid_utf8_names_the_line_of_the_first_bad_byte(tmp_path):
    content = 'question,answer\nQ1,A1\n"multi\nline",x\ncaf\u00e9,ok\n'.encode("utf-8")
    content += "na\u00efve,fine\n".encode("cp1252") + "r\u00e9sum\u00e9,bad again\n".encode("cp1252")
    path = write(tmp_path, content)

    message = rejection(path)

    assert "not valid UTF-8" in message
    assert "line 6 has the byte 0xef" in message
    assert f"(byte {content.index(b'na') + 3} of the file)" in message
    assert "Save the file as UTF-8" in message


def test_bad_byte_position_counts_the_byte_order_mark(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbftext\r\nok\r\nbad \xff\r\n")

    assert "line 3 has the byte 0xff (byte 18 of the file)" in rejection(path)


def test_utf16_file_is_rejected_as_not_utf8(tmp_path):
    path = write(tmp_path, "text\nhello\n".encode("utf-16"))

    message = rejection(path)

    assert "UTF-16" in message and "Save the file as UTF-8" in message


def test_nul_characters_are_rejected_with_their_line(tmp_path):
    path = write(tmp_path, "text\nhello\nwor\x00ld\n")

    assert "Line 3 contains a NUL character" in rejection(path)


@pytest.mark.parametrize("content", ["", "\n\n", "   \r\n  ", "\ufeff"])
def test_empty_file_is_rejected(tmp_path, content):
    path = write(tmp_path, content)

    message = rejection(path)

    assert "The file is empty" in message and "header" in message


def test_header_only_file_is_rejected(tmp_path):
    path = write(tmp_path, "question,answer\n\n")

    message = rejection(path)

    assert "no data rows" in message and "question, answer" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("\nquestion,answer\nq,a\n", "Line 1 is blank"),
        (",,\nq,a,b\n", "Line 1 has no column names"),
        ("1,2.5\n3,4\n", "holds only numbers (1, 2.5), so the file has no header"),
    ],
)
def test_missing_header_is_rejected(tmp_path, content, expected):
    path = write(tmp_path, content)

    message = rejection(path)

    assert expected in message and "column names" in message


def test_blank_column_names_are_listed(tmp_path):
    path = write(tmp_path, "question,,answer,\nq,x,a,y\n")

    message = rejection(path)

    assert "header (line 1)" in message and "columns 2, 4 have no name" in message


def test_duplicate_column_names_are_rejected_ignoring_case(tmp_path):
    path = write(tmp_path, "text,label,Text \nhello,x,again\n")

    message = rejection(path)

    assert "columns 1 ('text') and 3 ('Text') have the same name" in message and "distinct" in message


@pytest.mark.parametrize(("separator", "named"), [(";", "';'"), ("\t", "tabs")])
def test_single_column_with_another_separator_gets_a_hint(tmp_path, separator, named):
    path = write(tmp_path, f"question{separator}answer\nq{separator}a\n")

    message = rejection(path)

    assert "single column" in message and named in message and "commas" in message


@pytest.mark.parametrize(
    ("content", "line", "fields"),
    [
        ("question,answer\nq,a\nq,a,extra\n", 3, "3 fields"),
        ('question,answer\n"multi\nline",a\nonly one field\n', 4, "1 field "),
    ],
)
def test_ragged_row_is_rejected_with_its_line(tmp_path, content, line, fields):
    path = write(tmp_path, content)

    message = rejection(path)

    assert f"The row on line {line} has {fields}" in message
    assert "the header (line 1) has 2 columns (question, answer)" in message
    assert "quotes" in message


def test_text_after_a_closing_quote_is_rejected_with_its_line(tmp_path):
    path = write(tmp_path, 'question,answer\nq,a\n"quoted" tail,a\n')

    message = rejection(path)

    assert "Line 3 has text right after the closing quote" in message and '""' in message


def test_unclosed_quote_names_the_line_it_opens_on(tmp_path):
    path = write(tmp_path, 'question,answer\nq,a\n"never closed,a\nq,a\nq,a\n')

    message = rejection(path)

    assert "The row starting on line 3 opens a quoted field that is never closed" in message


def test_read_rows_rejects_what_inspect_rejects(tmp_path):
    path = write(tmp_path, "question,answer\nq,a,extra\n")

    with pytest.raises(DatasetError, match="line 2"):
        read_rows(path)
