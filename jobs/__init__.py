"""Ray jobs built on the captioning library."""
