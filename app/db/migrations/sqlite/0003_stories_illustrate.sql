-- See the PostgreSQL migration of the same number.
ALTER TABLE stories ADD COLUMN illustrate INTEGER NOT NULL DEFAULT 0;
