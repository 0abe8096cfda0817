"""Data in: every format a competition ships, read safely into uint8 tensors; demo data; device augmentation."""
