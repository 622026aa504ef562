"""One router per resource: images (queue, details, files), decisions, summary (meta, counts), page."""
