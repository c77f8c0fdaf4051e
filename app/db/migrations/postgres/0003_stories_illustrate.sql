-- Whether the caller asked for an illustration: with illustration_url null, it
-- tells "not asked" from "asked, but the image model could not draw it".
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustrate BOOLEAN NOT NULL DEFAULT FALSE;
