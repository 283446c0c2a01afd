"""bevfusion-ext."""
