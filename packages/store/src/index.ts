/** @lifeboat/store: public API. */
export {};
