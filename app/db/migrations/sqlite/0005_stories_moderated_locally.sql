-- See the PostgreSQL migration of the same number.
ALTER TABLE stories ADD COLUMN moderated_locally INTEGER CHECK (moderated_locally IN (0, 1));
