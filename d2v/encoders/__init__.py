"""Encoders in and out: d2v encoder directories, runs read as encoders, transformers import and export, starting a
run from an encoder (--init-from), and embedding a data set with one."""
