"""Text clean-up: conversion markup, OpenCC, normalisation, filters."""

from __future__ import annotations

from utils.data.text import (
    QualityFilter,
    cjk_ratio,
    ngram_hashes,
    normalize_text,
    resolve_conversion_markup,
    to_simplified,
)


def test_conversion_markup_prefers_simplified_variant():
    assert resolve_conversion_markup("用-{zh-cn:软件;zh-tw:軟體}-写") == "用软件写"
    assert resolve_conversion_markup("-{zh-tw:資訊;zh-hans:信息;}-") == "信息"
    assert resolve_conversion_markup("-{H|zh-cn:打印机;zh-tw:印表機}-打印") == "打印"
    assert resolve_conversion_markup("-{于}-尔班") == "于尔班"
    # entities inside a variant keep their ';', and HTML comments around templates are left alone
    assert resolve_conversion_markup("-{zh-tw:a&lt;b;zh-cn:c&lt;d}-") == "c&lt;d"
    assert resolve_conversion_markup("<!--{{Main|x}}-->") == "<!--{{Main|x}}-->"


def test_traditional_to_simplified():
    assert to_simplified("數學與電腦科學的歷史") == "数学与电脑科学的历史"


def test_normalize_removes_template_leftovers_and_fixes_punctuation():
    assert normalize_text("数学（）一词源自希腊语（，，）。") == "数学一词源自希腊语。"
    assert normalize_text("计算机科学（，有时缩写为）是学科") == "计算机科学（有时缩写为）是学科"
    assert normalize_text("天 文 学 , 是学科") == "天文学，是学科"
    assert normalize_text("ＡＢＣ１２３　和 English, words") == "ABC123 和 English, words"
    assert normalize_text("词源.\n\n   历史\t\t很长  \n") == "词源\n历史很长"


def test_quality_filter_rules():
    rule = QualityFilter(min_chars=5, max_chars=20, min_cjk_ratio=0.5)
    assert rule.check("短") == "too_short"
    assert rule.check("很" * 30) == "too_long"
    assert rule.check("english text 中文") == "low_cjk_ratio"
    assert rule.check("这是一段正常的中文") is None
    assert cjk_ratio("ab 中文") == 0.5 and cjk_ratio("") == 0.0
    assert cjk_ratio("𠀀㐀\t豈x\n") == 0.75  # Extension B (astral), Extension A, compatibility ideographs
    assert cjk_ratio(" \n\t") == 0.0


def test_ngram_hashes_are_the_windows_of_the_text_without_whitespace():
    hashes = ngram_hashes("天文 学\n天文学", 3)
    assert len(hashes) == 4 and hashes[0] == hashes[3] and len(set(hashes.tolist())) == 3
    assert ngram_hashes("天文", 3).size == 0
    assert ngram_hashes("天 文", 3, whole_if_shorter=True).tolist() == ngram_hashes("天文", 2).tolist()
    assert ngram_hashes(" ", 3, whole_if_shorter=True).tolist() == [0]
