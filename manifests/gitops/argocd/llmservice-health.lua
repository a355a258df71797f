-- Argo CD health check for piggyback.dev/LLMService (resource.customizations.health.piggyback.dev_LLMService).
-- Reads the operator's status: `Ready` aggregates Admitted, Placed, RuntimeReady and SLOMet, and when it is
-- False its reason is the first blocking condition's reason. Every reason the operator sets is listed below
-- as either transient (Progressing) or needing someone to act (Degraded); tests/operator/test_gitops.py
-- derives the operator's reasons from its source and fails when one is missing here.
hs = {}

-- The operator is working towards Ready: more replicas, first metrics, pods being scheduled or starting.
local progressing = {
  ScalingUp = true,          -- admission grows the pool by a replica
  WaitingForMetrics = true,  -- admission waits for the pool's first runtime figures
  Pending = true,            -- no replica scheduled onto a GPU node yet
  NoReadyReplicas = true,    -- runtime pods starting (model load)
  NotAdmitted = true,        -- a later condition waiting on admission
  -- CPUAttentionNodes (not part of Ready: BE attention falls back to the host CPUs meanwhile)
  RayClusterPending = true,  -- the pool's RayCluster not created yet
  RayClusterNotReady = true, -- its CPU-only workers starting
}
-- Nothing improves without a change: capacity, the spec, or a runtime that stopped answering.
local degraded = {
  InsufficientSLOHeadroom = true,
  NoGPUNode = true,
  InsufficientHostMemory = true,
  PlacementConflict = true,
  InvalidSpec = true,
  RuntimeNotResponding = true,
  AttainmentBelowTarget = true,
  KubeRayNotInstalled = true, -- cpuAttentionNodes asked for, but the KubeRay CRD is not served
}

local function condition(conditions, wanted)
  for _, c in ipairs(conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to report status"
  return hs
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "the operator has not yet acted on generation " .. tostring(generation)
  return hs
end

local ready = condition(status.conditions, "Ready")
if ready == nil then
  hs.status = "Progressing"
  hs.message = "no Ready condition yet"
  return hs
end
local message = (ready.reason or "") .. ": " .. (ready.message or "")
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
elseif progressing[ready.reason] then
  hs.status = "Progressing"
  hs.message = message
elseif degraded[ready.reason] then
  hs.status = "Degraded"
  hs.message = message
elseif ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = message
else
  -- A reason this check does not know (an operator newer than this file): say so rather than guess healthy.
  hs.status = "Degraded"
  hs.message = "unclassified reason " .. message
end
return hs
