"""Model factories: keyword-only arguments, each returns a ready Flow."""
