"""Stage two: a segmentation network learned from consensus masks and reviewers' corrections."""
