// Subscribes to one task with @supabase/realtime-js, exactly as the web app does,
// and prints one JSON line per event: {"status": ...} for subscription states,
// {"change": payload} for postgres_changes, {"system": payload} for system messages.
// Env: REALTIME_URL, ACCESS_TOKEN, TASK_ID. Each stdin line {"setAuth": token} calls client.setAuth(token).
import { RealtimeClient } from '@supabase/realtime-js'

const { REALTIME_URL, ACCESS_TOKEN, TASK_ID } = process.env
// Node 22+ and browsers have a global WebSocket; older Node needs the ws package.
const transport = globalThis.WebSocket ?? (await import('ws')).WebSocket

const client = new RealtimeClient(REALTIME_URL, { params: { apikey: ACCESS_TOKEN }, transport })
client.setAuth(ACCESS_TOKEN)
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

client
  .channel(`task:${TASK_ID}`)
  .on('postgres_changes', { event: '*', schema: 'public', table: 'tasks', filter: `id=eq.${TASK_ID}` }, (payload) =>
    out({ change: payload }),
  )
  .on('system', {}, (payload) => out({ system: payload }))
  .subscribe((status, err) => out({ status, error: err ? String(err) : null, vsn: client.vsn }))

let pending = ''
process.stdin.on('data', async (chunk) => {
  pending += chunk
  let end
  while ((end = pending.indexOf('\n')) >= 0) {
    const command = JSON.parse(pending.slice(0, end))
    pending = pending.slice(end + 1)
    if ('setAuth' in command) await client.setAuth(command.setAuth)
  }
})

process.on('SIGTERM', async () => {
  await client.removeAllChannels()
  process.exit(0)
})
