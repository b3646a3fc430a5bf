-- Delete delivered records (invariant 5): both limbs (and a latest meter's event time) in one
-- step, so no half record is left.
-- KEYS[1] sealed hash, KEYS[2] its hi hash, KEYS[3] its ts hash; ARGV fields (deleted in
-- chunks: unpack is bounded).
for i = 1, #ARGV, 1000 do
  local j = math.min(i + 999, #ARGV)
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
  redis.call('HDEL', KEYS[2], unpack(ARGV, i, j))
  redis.call('HDEL', KEYS[3], unpack(ARGV, i, j))
end
return #ARGV
