-- Intake looks up each web order id's most recent cases in creation order
-- (`ORDER BY created_at DESC LIMIT`), as it does for sales order numbers
-- through `cases_order_key`: an index in that order gives the lookup one
-- plan whatever the table's statistics say. It replaces the index on the
-- web order id alone, which equality lookups use just as well.
CREATE INDEX cases_web_order_recent ON cases (web_order_id, created_at DESC)
    WHERE web_order_id IS NOT NULL;
DROP INDEX cases_web_order_id;
