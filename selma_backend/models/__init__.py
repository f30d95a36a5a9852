"""Loading the artist's checkpoint, offline: render, train and evaluate all go through here."""
