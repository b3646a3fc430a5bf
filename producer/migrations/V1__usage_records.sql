-- Delivered usage, one row per record_id, never overwritten (the Processor contract: a
-- re-delivery is a no-op, a different record under a known id is refused). Amounts are exact
-- NUMERIC, inserted from the record's decimal text.
CREATE TABLE usage_records (
    record_id    text PRIMARY KEY,
    tenant_id    text NOT NULL,
    product_sku  text NOT NULL,
    use_unit     text NOT NULL,
    -- sum, count, max, min, latest: each aggregation of a key is a record of its own.
    aggregation  text NOT NULL,
    used_amount  numeric NOT NULL CHECK (used_amount >= 0),
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    -- 0 for the window's record, n for its n-th amendment (late pulses).
    amends       integer NOT NULL DEFAULT 0 CHECK (amends >= 0),
    -- For `latest`: when its value was measured.
    latest_at    timestamptz,
    -- After this no pulse is counted in this window any more (when the ingestor says).
    final_at     timestamptz,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX usage_records_tenant_window ON usage_records (tenant_id, window_start);

-- Records refused because their id was already stored with other values: kept for audit, the
-- stored record is left as it was.
CREATE TABLE refused_records (
    id          bigserial PRIMARY KEY,
    record_id   text NOT NULL,
    reason      text NOT NULL,
    offered     text NOT NULL,
    refused_at  timestamptz NOT NULL DEFAULT now()
);

-- What a tenant owes per window, key and aggregation: the window's record and its amendments
-- combined as the contract says.
CREATE VIEW window_usage AS
SELECT tenant_id,
       product_sku,
       use_unit,
       aggregation,
       window_start,
       max(window_end) AS window_end,
       CASE aggregation
           WHEN 'max' THEN max(used_amount)
           WHEN 'min' THEN min(used_amount)
           WHEN 'latest' THEN (array_agg(used_amount
                                         ORDER BY latest_at DESC NULLS LAST, amends DESC))[1]
           ELSE sum(used_amount) -- sum, count
       END AS used_amount,
       max(latest_at) AS latest_at,
       count(*) AS records,
       max(amends) AS amendments,
       max(final_at) AS final_at
FROM usage_records
GROUP BY tenant_id, product_sku, use_unit, aggregation, window_start;

-- A billing period: the windows whose start falls in [period_from, period_to) local time of
-- time zone `tz` (an IANA name such as America/Sao_Paulo), combined per sku, unit and
-- aggregation by the same rules (`latest`: the value of the latest measurement in the period).
CREATE FUNCTION billing_usage(p_tenant text, p_from date, p_to date, p_tz text)
RETURNS TABLE (product_sku text, use_unit text, aggregation text, used_amount numeric,
               windows bigint, records bigint)
LANGUAGE sql STABLE AS $$
    SELECT w.product_sku,
           w.use_unit,
           w.aggregation,
           CASE w.aggregation
               WHEN 'max' THEN max(w.used_amount)
               WHEN 'min' THEN min(w.used_amount)
               WHEN 'latest' THEN (array_agg(w.used_amount
                                             ORDER BY w.latest_at DESC NULLS LAST,
                                                      w.window_start DESC))[1]
               ELSE sum(w.used_amount)
           END,
           count(*),
           sum(w.records)::bigint
    FROM window_usage w
    WHERE w.tenant_id = p_tenant
      AND w.window_start >= (p_from::timestamp AT TIME ZONE p_tz)
      AND w.window_start <  (p_to::timestamp AT TIME ZONE p_tz)
    GROUP BY w.product_sku, w.use_unit, w.aggregation
    ORDER BY 1, 2, 3
$$;
