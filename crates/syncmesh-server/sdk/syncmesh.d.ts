// Types of the syncmesh JavaScript client (syncmesh.js). No runtime dependencies; runs in
// browsers and in Node.js 20+. Served by every node at /sdk/syncmesh.js and /sdk/syncmesh.d.ts.

/** States of the client's connection to its node. */
export type ConnectionState =
  | "connecting"
  | "connected"
  | "disconnected"
  | "denied"
  | "error";

/** How `client.map()` opens a map. */
export type OpenMode = "create_new" | "open_existing" | "open_or_create";

export interface SyncClientOptions {
  /** The node's base URL, e.g. `http://127.0.0.1:7700`. In a page the node serves: its origin (the default). */
  url?: string;
  /** The node's token (`syncmesh node --token`), sent as `Authorization: Bearer`. */
  token?: string;
  /** Operations kept while the node is unreachable (default 1000); beyond it a write rejects with code 20429. */
  maxQueue?: number;
  /** Attempts of `mutate` before it rejects with the revision conflict (default 10, at least 1). */
  mutateRetries?: number;
  /** A `fetch` implementation (default: the global one). */
  fetch?: typeof fetch;
}

/** The error codes the client raises or most often passes on. */
export declare const ErrorCodes: Readonly<{
  NO_PAGE: 20400;
  UNAUTHORIZED: 20003;
  QUEUE_FULL: 20429;
  SHUT_DOWN: 20499;
  BAD_ANSWER: 20502;
  MAP_NOT_FOUND: 54200;
  ITEM_NOT_FOUND: 54201;
  REVISION_MISMATCH: 54205;
  ITEM_EXISTS: 54208;
  NAME_TAKEN: 54301;
}>;

/** A failed operation: the node's error, or one raised by the client. */
export declare class SyncError extends Error {
  constructor(message: string, status: number, code: number);
  /** HTTP status (0 when no answer was received). */
  readonly status: number;
  /**
   * The Sync Maps error code (e.g. 54201 item not found, 54205 revision mismatch, 54208 item
   * exists, 20003 token refused). Raised by the client itself: 20429 the offline queue is full,
   * 20499 the client shut down or the map was closed, 20502 the node's answer was not understood.
   */
  readonly code: number;
}

export interface OpenOptions {
  /** Sid (`MP…`) or unique name. Omitted with `create_new`: a map without a unique name. */
  id?: string;
  /** Default `open_or_create`. */
  mode?: OpenMode;
  /** Seconds until the map expires, when this call creates it (0 or omitted: never). */
  ttl?: number;
}

export interface ItemMetadata {
  /** Seconds until the item expires (0: never); omitted keeps the current expiry. */
  ttl?: number;
}

/** One item of a map. `data` and `value` are the same object (`value` is the older SDK's name). */
export declare class SyncMapItem {
  readonly key: string;
  readonly data: Record<string, unknown>;
  readonly value: Record<string, unknown>;
  readonly revision: string;
  readonly dateCreated: Date;
  readonly dateUpdated: Date;
  readonly dateExpires: Date | null;
  /** Id of the node that created the item (`null` when the node did not say). */
  readonly createdBy: string | null;
}

export interface ItemQuery {
  /** Key to start from (inclusive). */
  from?: string;
  /** Items per page, 1 to 100 (default 50). */
  pageSize?: number;
  /** `asc` (default) or `desc` by key. */
  order?: "asc" | "desc";
}

/** One page of a listing; `nextPage()` / `prevPage()` fetch the neighbouring page. */
export declare class Paginator<T> {
  readonly items: T[];
  readonly hasNextPage: boolean;
  readonly hasPrevPage: boolean;
  /** Rejects with SyncError 20400 when there is no next page. */
  nextPage(): Promise<Paginator<T>>;
  /** Rejects with SyncError 20400 when there is no previous page. */
  prevPage(): Promise<Paginator<T>>;
}

/** What an `itemAdded` / `itemUpdated` handler receives. */
export interface ItemEventArgs {
  item: SyncMapItem;
  /** True exactly when this client object made the change. */
  isLocal: boolean;
  /** The data before (`itemUpdated` only; `undefined` for `itemAdded`). */
  previousItemData?: Record<string, unknown>;
  /** The item's key (as the older SDK's handlers read it from the item). */
  key: string;
  /** The item's data (older SDK name); also `data`. */
  value: Record<string, unknown>;
  data: Record<string, unknown>;
  /** The node's event id (per map and node, increasing). */
  eventId: number;
}

/** What an `itemRemoved` handler receives. */
export interface ItemRemovedArgs {
  key: string;
  isLocal: boolean;
  /** The data the item had. */
  previousItemData: Record<string, unknown>;
  eventId: number;
}

/** What a `removed` handler receives (the map was removed or expired). */
export interface MapRemovedArgs {
  isLocal: boolean;
  eventId: number;
}

export interface SyncMapEvents {
  itemAdded: ItemEventArgs;
  itemUpdated: ItemEventArgs;
  itemRemoved: ItemRemovedArgs;
  removed: MapRemovedArgs;
}

/** What [`SyncMap.getConflicts`] returns. */
export interface ItemConflicts {
  key: string;
  /**
   * Whole values written concurrently (set, mutate, create) that no later write resolved,
   * the visible one first; empty unless there are at least two.
   */
  values: Record<string, unknown>[];
  /** Field name → every current value written by concurrent updates, the visible one first. */
  fields: Record<string, unknown[]>;
  /** Node ids whose concurrent writes to the item are current, the winner first. */
  writers: string[];
}

/** A map of JSON items. Events are delivered once each, in order, across reconnects. */
export declare class SyncMap {
  readonly sid: string;
  readonly uniqueName: string | null;
  readonly dateUpdated: Date;
  readonly dateExpires: Date | null;
  /** Replaces the item's data (creating it). */
  set(key: string, data: Record<string, unknown>, metadata?: ItemMetadata): Promise<SyncMapItem>;
  /** Merges `data`'s top-level fields into the item (creating it). */
  update(key: string, data: Record<string, unknown>, metadata?: ItemMetadata): Promise<SyncMapItem>;
  /**
   * Sets the item to `mutator(current data)` (`{}` when the item does not exist), retried with
   * fresh data when another writer got there first. Returning `null` cancels: the promise then
   * resolves to the unchanged item (or `null` if there is none).
   */
  mutate(
    key: string,
    mutator: (current: Record<string, unknown>) => Record<string, unknown> | null | undefined,
    metadata?: ItemMetadata,
  ): Promise<SyncMapItem | null>;
  /** Rejects with SyncError 54201 when there is no such item. */
  get(key: string): Promise<SyncMapItem>;
  /** Rejects with SyncError 54201 when there is no such item. */
  remove(key: string): Promise<void>;
  /**
   * Every value concurrent writes left in the item's fields (the visible one first) and the
   * nodes whose concurrent writes are current, as this node sees them (a syncmesh extension).
   */
  getConflicts(key: string): Promise<ItemConflicts>;
  getItems(query?: ItemQuery): Promise<Paginator<SyncMapItem>>;
  /**
   * Every live item (all pages), lined up with this object's events: an event delivered to
   * its handlers after the promise resolves is a change the items do not show, every such
   * change is delivered, and none the items show is (a syncmesh extension). Events that
   * arrive while it reads wait until it resolves.
   */
  snapshot(): Promise<{ items: SyncMapItem[]; lastEventId: number }>;
  /** The map expires `ttl` seconds from now (0: never). */
  setTtl(ttl: number): Promise<void>;
  /** The item expires `ttl` seconds from now (0: never). */
  setItemTtl(key: string, ttl: number): Promise<void>;
  /** Removes the map and all its items, on every node. */
  removeMap(): Promise<void>;
  /** Stops this map's events; the client forgets the handle. */
  close(): void;
  on<E extends keyof SyncMapEvents>(event: E, handler: (args: SyncMapEvents[E]) => void): this;
  once<E extends keyof SyncMapEvents>(event: E, handler: (args: SyncMapEvents[E]) => void): this;
  off<E extends keyof SyncMapEvents>(event: E, handler: (args: SyncMapEvents[E]) => void): this;
  removeAllListeners(event?: keyof SyncMapEvents): this;
  /** Same as `on` / `off` (the older SDK's names). */
  addListener<E extends keyof SyncMapEvents>(event: E, handler: (args: SyncMapEvents[E]) => void): this;
  removeListener<E extends keyof SyncMapEvents>(event: E, handler: (args: SyncMapEvents[E]) => void): this;
}

/** This node, as `GET /v1/Node` describes it. */
export interface NodeStatus {
  peer_id: string | null;
  listen_addrs: string[];
  http_addr: string;
  connected_peers: string[];
  maps: number;
  node_id: string;
  version: string;
  /** Why the node stopped taking writes (a failed commit; reopen it once fixed), or null. */
  writes_stopped: string | null;
}

/** A map as a listing describes it. */
export interface MapDescriptor {
  sid: string;
  uniqueName: string | null;
  revision: string;
  dateCreated: Date;
  dateUpdated: Date;
  dateExpires: Date | null;
  createdBy: string;
}

export interface SyncClientEvents {
  connectionStateChanged: ConnectionState;
  /**
   * A map's event stream could not be resumed (the node no longer holds the events after the
   * last one seen, or never issued that id): the stream starts again from now, so the events in
   * between are not delivered. Re-read the map (`getItems`) to catch up.
   */
  streamReset: { sid: string; error: SyncError };
}

/** A client of one syncmesh node. */
export declare class SyncClient {
  constructor(options?: SyncClientOptions);
  /** Older SDK form: the token, then options. */
  constructor(token: string, options?: SyncClientOptions);
  readonly connectionState: ConnectionState;
  /** Opens a map by unique name or sid (`open_or_create`), or as `options` say. */
  map(nameOrOptions?: string | OpenOptions): Promise<SyncMap>;
  /** Live maps of the node, a page at a time. */
  maps(query?: { pageSize?: number }): Promise<Paginator<MapDescriptor>>;
  /** The node's identity, addresses and peers. */
  node(): Promise<NodeStatus>;
  /** Replaces the token (e.g. after `denied`) and reconnects. */
  updateToken(token: string): Promise<void>;
  /** Ends every stream; queued writes reject with SyncError 20499. */
  shutdown(): Promise<void>;
  on<E extends keyof SyncClientEvents>(event: E, handler: (arg: SyncClientEvents[E]) => void): this;
  once<E extends keyof SyncClientEvents>(event: E, handler: (arg: SyncClientEvents[E]) => void): this;
  off<E extends keyof SyncClientEvents>(event: E, handler: (arg: SyncClientEvents[E]) => void): this;
  addListener<E extends keyof SyncClientEvents>(event: E, handler: (arg: SyncClientEvents[E]) => void): this;
  removeListener<E extends keyof SyncClientEvents>(event: E, handler: (arg: SyncClientEvents[E]) => void): this;
  removeAllListeners(event?: keyof SyncClientEvents): this;
}

export default SyncClient;

/** Compares two keys in the order the node lists them (by Unicode code point). */
export declare function compareKeys(a: string, b: string): number;
