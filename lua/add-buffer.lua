--[[
add-buffer.lua: merge subsegments (spans of one project and trace that share a parent) into
the segments they belong to, and return where each went.

The payload bytes are not touched here: the client has already written them (SADD) to each
subsegment's payload key `span-buf:s:{<pt>:<salt>}:<salt>`. This script only maintains the
segment bookkeeping, so it stays atomic within the `{<pt>}` cluster slot.

One call carries one or more subsegment records of the same trace. A call with one record is
exactly Sentry's 9-argument call. Records are applied in order with Sentry's per-subsegment
algorithm; reads are gathered up front (HMGET, MGET) and writes are applied once at the end,
because each redis.call costs microseconds of the shard's single thread.

KEYS[1]   pt = "<project_id>:<trace_id>"; every key below carries the hash tag "{<pt>}",
          either directly or inside an embedded segment key, so one slot is touched.
ARGV      one or more records of 9 fields followed by the record's span ids:
  1 num_spans            integer, spans in this subsegment
  2 parent_span_id       common parent of the subsegment (the root's own id if present)
  3 has_root_span        "true" | "false"
  4 set_timeout          integer seconds; TTL (re)set on every key written
  5 byte_count           integer, sum of the uncompressed payload lengths
  6 max_segment_bytes    integer, 0 = unlimited; over it the subsegment detaches
  7 salt                 32 hex chars, names the payload key; detached segments use it
  8 check_flush_lock     "true" | "false"; detach when the target is being flushed
  9 metrics_sample_rate  integer N: metrics are gathered for about 1 call in N
  10.. span ids (num_spans of them)

RETURNS   six values per record, concatenated:
          { segment_key,             "span-buf:s:{<pt>}:<root span id or salt>"
            has_root_span,           1 or nil
            latency_us,              total microseconds of the call on the first record when
                                     sampled, else -1
            latency_table,           flat { name, value, ... } (first record, when sampled)
            metrics_table,           flat { name, value, ... } ({} when not sampled)
            merged_segment_span_ids  span ids whose own segment was merged into this one }

Key shapes must match spans-pipeline/src/buffer/keys.rs.
]]

local project_and_trace = KEYS[1]

-- Lua's unpack() fails beyond a few thousand values, so variadic commands are chunked.
local CHUNK = 1000
-- Redirect chains are short in practice (depth 2); the bound keeps a corrupt map from looping.
local MAX_REDIRECT_DEPTH = 100
-- SSCAN page size when moving one member-keys index into another.
local MERGE_PAGE = 1000
local RECORD_FIELDS = 9

local tag = "{" .. project_and_trace .. "}"
local redirect_key = "span-buf:ssr:" .. tag

-- Key strings are built once per span id and call: Lua string building costs about as much
-- as a redis.call read.
local built = { s = {}, mk = {}, ic = {}, ibc = {}, hrs = {}, fl = {} }

-- `span-buf:s:{<pt>}:<id>` (segment key) and `span-buf:mk:{<pt>}:<id>` (member keys) embed
-- the trace tag; `span-buf:<ic|ibc|hrs|fl>:<segment key>` embed the segment key.
local function key_of(kind, span_id)
    local cache = built[kind]
    local key = cache[span_id]
    if key == nil then
        if kind == "s" or kind == "mk" then
            key = "span-buf:" .. kind .. ":" .. tag .. ":" .. span_id
        else
            key = "span-buf:" .. kind .. ":" .. key_of("s", span_id)
        end
        cache[span_id] = key
    end
    return key
end

local function segment_key_of(span_id)
    return key_of("s", span_id)
end

local function member_keys_of(span_id)
    return key_of("mk", span_id)
end

-- `span-buf:<kind>:<segment key>` for kind ic, ibc, hrs or fl.
local function metadata_key_of(kind, span_id)
    return key_of(kind, span_id)
end

-- Runs `command key values...` in chunks of CHUNK values.
local function chunked(command, key, values)
    for first = 1, #values, CHUNK do
        redis.call(command, key, unpack(values, first, math.min(first + CHUNK - 1, #values)))
    end
end

-- Parse the records. Each consumes 9 fields plus its span ids, so the loop is bounded by #ARGV.
local records = {}
local position = 1
while position <= #ARGV do
    local num_spans = tonumber(ARGV[position])
    if num_spans == nil or num_spans < 0 or position + RECORD_FIELDS - 1 + num_spans > #ARGV then
        return redis.error_reply("malformed subsegment record at argument " .. position)
    end
    records[#records + 1] = {
        num_spans = num_spans,
        parent_span_id = ARGV[position + 1],
        has_root_span = ARGV[position + 2] == "true",
        set_timeout = tonumber(ARGV[position + 3]),
        byte_count = tonumber(ARGV[position + 4]),
        max_segment_bytes = tonumber(ARGV[position + 5]),
        salt = ARGV[position + 6],
        check_flush_lock = ARGV[position + 7] == "true",
        first_span = position + RECORD_FIELDS,
        last_span = position + RECORD_FIELDS - 1 + num_spans,
    }
    position = position + RECORD_FIELDS + num_spans
end
if #records == 0 then
    return {}
end

-- Sampling without a TIME call: the salt is a hash, so its first digits are uniform. A salt
-- that is not hex (direct script tests) is sampled only when the rate is 1.
local metrics_sample_rate = tonumber(ARGV[RECORD_FIELDS]) or 1
local sampled = metrics_sample_rate <= 1
if not sampled then
    local prefix = tonumber(string.sub(records[1].salt, 1, 8), 16)
    sampled = prefix ~= nil and prefix % metrics_sample_rate == 0
end
local function now_us()
    local t = redis.call("TIME")
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local start_us = 0
if sampled then
    start_us = now_us()
end

-- Resolve each record's parent through the redirect map, in order: a record sees the
-- redirects written by the records before it. `redirects` caches reads and holds this call's
-- writes (false = known absent).
local redirects = {}
local parents = {}
for _, record in ipairs(records) do
    if redirects[record.parent_span_id] == nil then
        redirects[record.parent_span_id] = false
        parents[#parents + 1] = record.parent_span_id
    end
end
for first = 1, #parents, CHUNK do
    local last = math.min(first + CHUNK - 1, #parents)
    local values = redis.call("HMGET", redirect_key, unpack(parents, first, last))
    for i = first, last do
        redirects[parents[i]] = values[i - first + 1]
    end
end
local function redirect_of(span_id)
    local target = redirects[span_id]
    if target == nil then
        target = redis.call("HGET", redirect_key, span_id)
        redirects[span_id] = target
    end
    return target
end

local redirect_fields = {}
local written_redirects = {}
for _, record in ipairs(records) do
    local set_span_id = record.parent_span_id
    local depth = 0
    for step = 1, MAX_REDIRECT_DEPTH do
        local next_id = redirect_of(set_span_id)
        if not next_id or next_id == set_span_id then
            break
        end
        set_span_id = next_id
        depth = step
    end
    record.root_span_id = set_span_id
    record.redirect_depth = depth
    -- Point every span of the subsegment at the (pre-detach) segment root.
    for i = record.first_span, record.last_span do
        local span_id = ARGV[i]
        redirects[span_id] = set_span_id
        if not written_redirects[span_id] then
            written_redirects[span_id] = true
            redirect_fields[#redirect_fields + 1] = span_id
        end
    end
    -- Spans that may have been segment roots before: their counters come along.
    record.children = {}
    for i = record.first_span, record.last_span do
        local span_id = ARGV[i]
        if span_id ~= record.parent_span_id and span_id ~= set_span_id then
            record.children[#record.children + 1] = span_id
        end
    end
end
local redirect_done_us = 0
if sampled then
    redirect_done_us = now_us()
end

-- Read every counter, root flag and lock the records can touch with one MGET (per chunk).
local values = {}
local lookup = {}
local function want(key)
    if values[key] == nil then
        values[key] = false
        lookup[#lookup + 1] = key
    end
end
for _, record in ipairs(records) do
    local root = record.root_span_id
    want(metadata_key_of("hrs", root))
    want(metadata_key_of("ic", root))
    want(metadata_key_of("ibc", root))
    want(metadata_key_of("ic", record.salt))
    want(metadata_key_of("ibc", record.salt))
    if record.check_flush_lock then
        want(metadata_key_of("fl", root))
    end
    for _, child in ipairs(record.children) do
        want(metadata_key_of("ic", child))
        want(metadata_key_of("ibc", child))
    end
end
for first = 1, #lookup, CHUNK do
    local last = math.min(first + CHUNK - 1, #lookup)
    local page = redis.call("MGET", unpack(lookup, first, last))
    for i = first, last do
        values[lookup[i]] = page[i - first + 1]
    end
end

-- Keys whose value changed, with the TTL to write them with. A false value means "delete".
local dirty = {}
local dirty_order = {}
local function set_value(key, value, ttl)
    values[key] = value
    if dirty[key] == nil then
        dirty_order[#dirty_order + 1] = key
    end
    dirty[key] = ttl
end
local function number_of(key)
    return tonumber(values[key] or "0")
end

-- Salts to add per member-keys index, in first-seen order.
local pending_salts = {}
local pending_order = {}
local pending_ttl = {}
local function add_salts(span_id, salts, ttl)
    local list = pending_salts[span_id]
    if list == nil then
        list = {}
        pending_salts[span_id] = list
        pending_order[#pending_order + 1] = span_id
    end
    for _, salt in ipairs(salts) do
        list[#list + 1] = salt
    end
    pending_ttl[span_id] = ttl
end

-- Span ids whose member-keys index was merged away; deleted with the other keys at the end.
local removed_member_keys = {}

local merge_start_us = 0
if sampled then
    merge_start_us = now_us()
end
local results = {}
for index, record in ipairs(records) do
    local ttl = record.set_timeout
    local set_span_id = record.root_span_id
    local pre_detach_span_id = set_span_id

    -- Remember that the segment has seen its root (before any detach decision, like Sentry).
    local root_flag_key = metadata_key_of("hrs", set_span_id)
    local has_root_span = record.has_root_span or values[root_flag_key] == "1"
    if has_root_span then
        set_value(root_flag_key, "1", ttl)
    end

    local byte_count = record.byte_count
    for _, child in ipairs(record.children) do
        byte_count = byte_count + number_of(metadata_key_of("ibc", child))
    end

    -- Detach into a segment of its own when the target is too big or is being flushed. No
    -- payload moves: the payload key is already named by the salt.
    local ingested_byte_count = number_of(metadata_key_of("ibc", set_span_id))
    local too_large = record.max_segment_bytes > 0
        and ingested_byte_count + byte_count > record.max_segment_bytes
    local locked = record.check_flush_lock
        and values[metadata_key_of("fl", pre_detach_span_id)] ~= false
    if too_large or locked then
        set_span_id = record.salt
    end
    local set_key = segment_key_of(set_span_id)
    local counter_key = metadata_key_of("ic", set_span_id)
    local byte_counter_key = metadata_key_of("ibc", set_span_id)
    local member_keys_key = member_keys_of(set_span_id)

    -- Merge the segments of former roots into this one: counters, then their member-keys
    -- index (paged with SSCAN rather than SUNIONSTORE, because the target can be huge).
    local merged_segment_span_ids = {}
    for _, child in ipairs(record.children) do
        local child_count = values[metadata_key_of("ic", child)]
        if child_count then
            set_value(counter_key, tostring(number_of(counter_key) + tonumber(child_count)), ttl)
            set_value(metadata_key_of("ic", child), false, ttl)
        end
        if values[metadata_key_of("ibc", child)] then
            set_value(metadata_key_of("ibc", child), false, ttl)
        end
        if child_count then
            -- Its salts join this segment's pending SADD; its index is deleted at the end.
            local child_member_keys = member_keys_of(child)
            local cursor = "0"
            repeat
                local page = redis.call("SSCAN", child_member_keys, cursor, "COUNT", MERGE_PAGE)
                cursor = page[1]
                add_salts(set_span_id, page[2], ttl)
            until cursor == "0"
            removed_member_keys[#removed_member_keys + 1] = child
            if pending_salts[child] then
                add_salts(set_span_id, pending_salts[child], ttl)
                pending_salts[child] = {}
            end
            merged_segment_span_ids[#merged_segment_span_ids + 1] = child
        end
    end

    add_salts(set_span_id, { record.salt }, ttl)
    set_value(counter_key, tostring(number_of(counter_key) + record.num_spans), ttl)
    set_value(byte_counter_key, tostring(number_of(byte_counter_key) + byte_count), ttl)

    results[index] = {
        set_key = set_key,
        has_root_span = has_root_span,
        merged = merged_segment_span_ids,
        too_large = too_large,
        locked = locked,
    }
end

-- Apply the writes: redirects, counters and flags, member-keys indexes.
if #redirect_fields > 0 then
    local fields = {}
    for _, span_id in ipairs(redirect_fields) do
        fields[#fields + 1] = span_id
        fields[#fields + 1] = redirects[span_id]
    end
    for first = 1, #fields, 2 * CHUNK do
        redis.call("HSET", redirect_key, unpack(fields, first, math.min(first + 2 * CHUNK - 1, #fields)))
    end
    redis.call("EXPIRE", redirect_key, records[#records].set_timeout)
end
local deleted = {}
for _, span_id in ipairs(removed_member_keys) do
    if pending_salts[span_id] == nil or #pending_salts[span_id] == 0 then
        deleted[#deleted + 1] = member_keys_of(span_id)
    end
end
for _, key in ipairs(dirty_order) do
    local value = values[key]
    if value then
        redis.call("SET", key, value, "EX", dirty[key])
    else
        deleted[#deleted + 1] = key
    end
end
for first = 1, #deleted, CHUNK do
    redis.call("DEL", unpack(deleted, first, math.min(first + CHUNK - 1, #deleted)))
end
for _, span_id in ipairs(pending_order) do
    local salts = pending_salts[span_id]
    if #salts > 0 then
        local key = member_keys_of(span_id)
        chunked("SADD", key, salts)
        redis.call("EXPIRE", key, pending_ttl[span_id])
    end
end

local reply = {}
local end_us = 0
if sampled then
    end_us = now_us()
end
local table_size = 0
if sampled then
    table_size = redis.call("HLEN", redirect_key)
end
for index, record in ipairs(records) do
    local result = results[index]
    local latency_us = -1
    local latency_table = {}
    local metrics_table = {}
    if sampled then
        if index == 1 then
            latency_us = end_us - start_us
            latency_table = {
                "redirect_step_latency_us", redirect_done_us - start_us,
                "merge_payload_keys_step_latency_us", end_us - merge_start_us,
                "counter_merge_step_latency_us", merge_start_us - redirect_done_us,
                "total_step_latency_us", latency_us,
            }
        end
        metrics_table = {
            "redirect_table_size", table_size,
            "redirect_depth", record.redirect_depth,
            "detached_segment_too_large", result.too_large and 1 or 0,
            "detached_segment_locked", result.locked and 1 or 0,
            "span_count", record.num_spans,
        }
    end
    reply[#reply + 1] = result.set_key
    reply[#reply + 1] = result.has_root_span
    reply[#reply + 1] = latency_us
    reply[#reply + 1] = latency_table
    reply[#reply + 1] = metrics_table
    reply[#reply + 1] = result.merged
end
return reply
